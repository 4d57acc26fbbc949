"""DUET's and ScaleVLN's release files, written small in their exact formats for tests: pretraining
lines (``*_enc.jsonl``), fine-tuning path items with ``instr_encodings`` (``*_enc.json``), an HM3D-style
house in its own connectivity folder, community view features (``{scan}_{viewpoint}`` -> (36, D)) and
teacher checkpoints at any size in the upstream layouts (tensors stored as one broadcast value, so a
180M-parameter teacher is a few kilobytes on disk).  The formats are those DUET's readers take
(``pretrain_src/data/dataset.py``, ``map_nav_src/r2r/data_utils.py``, ``utils/data.py`` of cshizhe/VLN-DUET)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import torch
from tinyworld import POS

from minivln.data.graph import Graphs
from minivln.data.tokenizer import get_tokenizer
from minivln.model.registry import create_model

HM3D_SCAN = "00000-kfPV7w3FaU5"  # ScaleVLN/HM3D-style house name and viewpoint ids


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def r2r_lines(items: list[dict], *, with_text: bool = True) -> list[dict]:
    """R2R path items -> DUET pretraining lines (one per instruction), ids from the BERT tokenizer."""
    tok = get_tokenizer()
    rows = []
    for item in items:
        for k, text in enumerate(item["instructions"]):
            row = {"instr_id": f"{item['path_id']}_{k}", "scan": item["scan"], "path": item["path"],
                   "heading": item["heading"], "instr_encoding": tok.encode(text)}
            if with_text:
                row["instruction"] = text
            rows.append(row)
    return rows


def write_hm3d_house(folder: Path) -> Path:
    """A generated-graph house in the Matterport3D connectivity format, without ``visible`` and
    ``height`` (DUET's loader reads neither): the tiny house's layout, ids 000000..000004."""
    names = [n for n in POS if n != "f"]
    ids = {n: f"{i:06d}" for i, n in enumerate(names)}
    edges = {("a", "b"), ("b", "c"), ("c", "d"), ("b", "e")}
    entries = []
    for n in names:
        x, y, z = POS[n]
        entries.append({"image_id": ids[n], "pose": [1, 0, 0, x, 0, 1, 0, y, 0, 0, 1, z, 0, 0, 0, 1],
                        "included": True,
                        "unobstructed": [(n, m) in edges or (m, n) in edges for m in names]})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{HM3D_SCAN}_connectivity.json").write_text(json.dumps(entries))
    (folder / "scans.txt").write_text(HM3D_SCAN + "\n")
    return folder


def hm3d_lines(n: int = 4) -> list[dict]:
    tok = get_tokenizer()
    paths = [["000000", "000001", "000002", "000003"], ["000004", "000001", "000000"]]
    return [{"instr_id": f"hm3d{i}_0", "scan": HM3D_SCAN, "path": paths[i % 2], "heading": 0.5 * i,
             "instr_encoding": tok.encode(f"walk past the sofa and stop number {i}")} for i in range(n)]


def r2r_items(items: list[dict]) -> list[dict]:
    """Official R2R path items -> DUET's fine-tuning ``R2R_*_enc.json`` items (``instr_encodings`` added)."""
    tok = get_tokenizer()
    return [{**item, "instr_encodings": [tok.encode(t) for t in item["instructions"]]} for item in items]


def hm3d_items(n: int = 2) -> list[dict]:
    """ScaleVLN-style augmented fine-tuning items (``R2R_scalevln_ft_aug_enc.json``) in the HM3D house."""
    tok = get_tokenizer()
    paths = [["000000", "000001", "000002", "000003"], ["000004", "000001", "000000"]]
    texts = [f"go through the hall and wait at the door number {i}" for i in range(n)]
    return [{"path_id": 9000 + i, "scan": HM3D_SCAN, "path": paths[i % 2], "heading": 0.3 * i, "distance": 4.0,
             "instructions": [texts[i]], "instr_encodings": [tok.encode(texts[i])]} for i in range(n)]


def write_view_features(path: Path, data_dir: Path, dim: int, extra_dirs: list[Path] = (), logits: bool = False,
                        seed: int = 0) -> Path:
    """Random view features of every house of ``data_dir`` (and ``extra_dirs``) in the community layout:
    one (36, D) float32 dataset per ``{scan}_{viewpoint}``, no attributes (as DUET's and ScaleVLN's
    files); ``logits``: (36, D + 1000), the ImageNet class logits after the features (DUET's ViT files)."""
    rng = np.random.default_rng(seed)
    graphs = Graphs(data_dir, list(extra_dirs))
    width = dim + (1000 if logits else 0)
    scans = set(graphs.scans()) | {f.name[: -len("_connectivity.json")] for d in extra_dirs
                                   for f in Path(d).glob("*_connectivity.json")}
    with h5py.File(path, "w") as f:
        for scan in sorted(scans):
            for vp in graphs[scan].vp_ids:
                f[f"{scan}_{vp}"] = rng.standard_normal((36, width)).astype(np.float32)
    return path


def _broadcast(shape: torch.Size) -> torch.Tensor:
    """A zero tensor of ``shape`` backed by one stored value (torch.save keeps the view)."""
    return torch.zeros([1] * len(shape)).expand(shape)


def teacher_state_dict(preset: str, **overrides) -> dict[str, torch.Tensor]:
    """A preset's parameter names and shapes, every tensor a broadcast zero (no model is built)."""
    return {k: _broadcast(v.shape) for k, v in create_model(preset, device="meta", **overrides).state_dict().items()}


def write_finetune_checkpoint(path: Path, preset: str, **overrides) -> Path:
    """DUET's / ScaleVLN's fine-tuned agent file (``best_val_unseen``): ``{'vln_bert': {'epoch',
    'state_dict'}, 'critic': ...}`` with ``vln_bert.`` keys."""
    sd = {f"vln_bert.{k}": v for k, v in teacher_state_dict(preset, **overrides).items()}
    torch.save({"vln_bert": {"epoch": 1, "state_dict": sd}, "critic": {"epoch": 1, "state_dict": {}}}, path)
    return path


def write_pretrain_checkpoint(path: Path, preset: str, **overrides) -> Path:
    """DUET's / ScaleVLN's pretraining file (``model_step_N.pt``): one flat dict, the backbone under
    ``bert.``, the SAP/OG heads at the top, and the pretraining-only tensors (the cross-modal layers'
    language branch, the MLM and MRC heads)."""
    heads = ("global_sap_head.", "local_sap_head.", "sap_fuse_linear.", "og_head.")
    cfg = create_model(preset, device="meta", **overrides).config
    out = {(k if k.startswith(heads) else "bert." + k): v for k, v in teacher_state_dict(preset, **overrides).items()}
    h = cfg.hidden_size
    for branch in ("global_encoder", "local_encoder"):
        for i in range(cfg.num_x_layers):
            base = f"bert.{branch}.encoder.x_layers.{i}"
            out[f"{base}.lang_self_att.self.query.weight"] = _broadcast(torch.Size([h, h]))
            out[f"{base}.lang_inter.dense.weight"] = _broadcast(torch.Size([cfg.intermediate_size, h]))
    out["mlm_head.predictions.decoder.weight"] = _broadcast(torch.Size([cfg.vocab_size, h]))
    out["image_classifier.net.3.weight"] = _broadcast(torch.Size([1000, h]))
    torch.save(out, path)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path
