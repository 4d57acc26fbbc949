"""Which instruction representation lets a *pretrained* DUET learn object grounding quickly?

Issue 20's grounding study, the training-free and frozen-feature part (minutes on one core).  The
samples are REVERIE instructions whose annotated goal viewpoint lists the target object; the
candidates are that viewpoint's objects from the STAND-IN object file (``[E(name) | room cue]``).

* ``picker``: no training: the cosine of the instruction's all-MiniLM-L6-v2 embedding with each
  object's name block (dims 0-383), arg-max.  The ceiling of what the names carry, roughly.
* ``frozen``: the R2R-pretrained duet-cpu teacher, frozen; each object is its object embedding
  (``img_embeddings.embed_objects``), the instruction one of three vectors, and only a bilinear map
  ``score = object . W . text`` (W zero at start) is trained with AdamW (batch 32, 600 steps, lr 1e-3):
  - ``mean``: the mean of the teacher's text-encoder output over the real tokens;
  - ``attention``: its input embeddings pooled with a learned softmax query;
  - ``minilm``: the instruction's all-MiniLM-L6-v2 embedding (what ``og_text_encoder: minilm`` feeds).

    python studies/reverie_grounding/frozen_probe.py --data-dir ../shared/data \\
        --objects standin_objects.hdf5 --teacher ../shared/teachers/duet-cpu-r2r-pretrained \\
        --out studies/reverie_grounding/frozen_probe.json

The accuracy is over the first ``--val`` val_unseen samples (chance: the mean of 1 / objects).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from minivln.bench.common import code_version, machine_info
from minivln.data.datasets import load_episodes
from minivln.data.tokenizer import get_tokenizer
from minivln.features.embed import embed_instructions
from minivln.features.hdf5 import ObjectFeatureStore
from minivln.model.checkpoint import load_pretrained
from minivln.paths import atomic_write_text

STEPS = (100, 300, 600)


def samples(split: str, data_dir: str, store: ObjectFeatureStore, limit: int) -> dict:
    """Instructions whose goal viewpoint lists the target: token ids, texts, objects, label."""
    tok = get_tokenizer(80)
    ids, texts, fts, labels = [], [], [], []
    for ep in load_episodes("reverie", split, data_dir):
        objs = store.get(ep.scan, ep.goal)
        obj_ids = [int(x) for x in objs.obj_ids]
        if int(ep.obj_id) not in obj_ids:
            continue
        ids.append(tok.encode(ep.instruction)[:80])
        texts.append(ep.instruction)
        fts.append(np.asarray(objs.fts, np.float32))
        labels.append(obj_ids.index(int(ep.obj_id)))
        if len(labels) == limit:
            break
    b, t, k = len(ids), max(map(len, ids)), max(len(f) for f in fts)
    txt = torch.zeros(b, t, dtype=torch.long)
    obj = torch.zeros(b, k, fts[0].shape[1])
    obj_mask = torch.zeros(b, k, dtype=torch.bool)
    for i, (a, f) in enumerate(zip(ids, fts)):
        txt[i, : len(a)] = torch.tensor(a)
        obj[i, : len(f)] = torch.from_numpy(f)
        obj_mask[i, : len(f)] = True
    return {"txt_ids": txt, "txt_masks": txt != 0, "objects": obj, "obj_masks": obj_mask,
            "labels": torch.tensor(labels), "texts": texts}


@torch.no_grad()
def teacher_views(model, s: dict) -> dict:
    """The frozen teacher's object embeddings and the three instruction representations."""
    out = {"objects": [], "emb": [], "mean": []}
    for a in range(0, len(s["labels"]), 256):
        ids, masks = s["txt_ids"][a : a + 256], s["txt_masks"][a : a + 256]
        emb = model.embeddings(ids)
        enc = model.lang_encoder(emb, masks)
        w = masks[..., None].float()
        out["emb"].append(emb)
        out["mean"].append((enc * w).sum(1) / w.sum(1))
        out["objects"].append(model.img_embeddings.embed_objects(s["objects"][a : a + 256]))
    views = {k: torch.cat(v) for k, v in out.items()}
    views["minilm"] = embed_instructions("minilm", s["texts"])
    return views


def train_bilinear(text: str, tr: dict, trv: dict, va: dict, vav: dict, lr: float, seed: int) -> dict[int, float]:
    """Fit ``object . W . text`` (plus a softmax query for ``attention``) on train; val accuracy per step."""
    torch.manual_seed(seed)
    h = trv["objects"].shape[-1]
    d = trv["minilm"].shape[-1] if text == "minilm" else h
    w = torch.zeros(h, d, requires_grad=True)
    query = torch.zeros(h, requires_grad=True)
    opt = torch.optim.AdamW([w, query] if text == "attention" else [w], lr=lr)

    def instruction(views: dict, masks: torch.Tensor, rows) -> torch.Tensor:
        if text == "attention":
            emb = views["emb"][rows]
            a = (emb @ query).masked_fill(~masks[rows], float("-inf")).softmax(-1)
            return (a[..., None] * emb).sum(1)
        return views[text][rows]

    def scores(views: dict, s: dict, rows) -> torch.Tensor:
        t = instruction(views, s["txt_masks"], rows)
        sc = torch.einsum("bkh,hd,bd->bk", views["objects"][rows], w, t)
        return sc.masked_fill(~s["obj_masks"][rows], float("-inf"))

    g = torch.Generator().manual_seed(seed)
    acc = {}
    for step in range(1, max(STEPS) + 1):
        rows = torch.randint(0, len(tr["labels"]), (32,), generator=g)
        loss = F.cross_entropy(scores(trv, tr, rows), tr["labels"][rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in STEPS:
            with torch.no_grad():
                pred = scores(vav, va, slice(None)).argmax(1)
            acc[step] = float((pred == va["labels"]).float().mean())
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--objects", required=True, help="stand-in object features (minivln features build --objects-out)")
    p.add_argument("--teacher", required=True, help="the R2R-pretrained duet-cpu (save_pretrained directory)")
    p.add_argument("--train", type=int, default=5000, help="train samples used (first N)")
    p.add_argument("--val", type=int, default=1500, help="val_unseen samples scored (first N)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON report")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    store = ObjectFeatureStore(args.objects)
    tr = samples("train", args.data_dir, store, args.train)
    va = samples("val_unseen", args.data_dir, store, args.val)
    e = embed_instructions("minilm", va["texts"])
    cos = (va["objects"][..., :384] * e[:, None]).sum(-1).masked_fill(~va["obj_masks"], float("-inf"))
    report = {
        "what": "object grounding at the goal viewpoint, REVERIE val_unseen (first N samples), STAND-IN objects",
        "train_samples": len(tr["labels"]), "val_samples": len(va["labels"]),
        "chance": float((1 / va["obj_masks"].sum(1).float()).mean()),
        "picker_minilm_cosine": float((cos.argmax(1) == va["labels"]).float().mean()),
        "frozen_teacher": {}, "teacher": args.teacher, "lr": args.lr, "seed": args.seed,
        "code": code_version(), "machine": machine_info(1, ()), "date": time.strftime("%Y-%m-%d"),
    }
    model = load_pretrained(args.teacher).eval()
    trv, vav = teacher_views(model, tr), teacher_views(model, va)
    for text in ("mean", "attention", "minilm"):
        report["frozen_teacher"][text] = train_bilinear(text, tr, trv, va, vav, args.lr, args.seed)
        print(text, report["frozen_teacher"][text], flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    atomic_write_text(args.out, json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine",)}, indent=1))


if __name__ == "__main__":
    main()
