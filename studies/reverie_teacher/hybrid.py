"""The R2R fine-tuned teacher with the REVERIE grounding head: a zero-shot reference (issue 20).

Every tensor of the REVERIE-pretrained teacher that the shared R2R fine-tuned ``duet-cpu`` also has
(423 of 431: all but ``og_head`` and ``og_text_proj``) is replaced by the R2R fine-tuned one, so the
network navigates as the R2R teacher does and grounds with the REVERIE pretraining's head.

    python studies/reverie_teacher/hybrid.py --reverie runs/reverie-prereg/runs/rev-teacher-pre/pretrained \\
        --r2r ../shared/teachers/duet-cpu-r2r-finetuned --out HYBRID
"""

from __future__ import annotations

import argparse

from minivln.model.checkpoint import load_pretrained, save_pretrained


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reverie", required=True, help="a REVERIE model with the grounding head")
    p.add_argument("--r2r", required=True, help="an R2R model of the same architecture otherwise")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rev, r2r = load_pretrained(args.reverie), load_pretrained(args.r2r)
    sd, theirs = rev.state_dict(), r2r.state_dict()
    shared = {k: theirs[k].to(v.dtype) for k, v in sd.items() if k in theirs and theirs[k].shape == v.shape}
    rev.load_state_dict({**sd, **shared})
    save_pretrained(rev, args.out)
    print(f"{len(shared)} of {len(sd)} tensors from {args.r2r}; the rest ({', '.join(sorted(set(sd) - set(shared)))}) "
          f"from {args.reverie}")


if __name__ == "__main__":
    main()
