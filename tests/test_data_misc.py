import shutil

import pytest

from minivln.cli import main
from minivln.data.download import download, load_manifest, official_url
from minivln.data.tokenizer import (
    BERT_VOCAB_SIZE,
    CLS_ID,
    SEP_ID,
    Tokenizer,
    get_tokenizer,
)


def test_tokenizer_is_bert_uncased():
    tok = get_tokenizer()
    assert tok.vocab_size == BERT_VOCAB_SIZE
    ids = tok.encode("Walk past the Coffee table.")
    # bert-base-uncased ids: walk 3328, past 2627, the 1996, coffee 4157, table 2795, '.' 1012
    assert ids == [CLS_ID, 3328, 2627, 1996, 4157, 2795, 1012, SEP_ID]
    assert tok.tokens("bathtub")[1:-1] == ["bath", "##tub"]
    assert len(Tokenizer(max_len=5).encode("a b c d e f g h")) == 5


def test_manifest_covers_release():
    specs = load_manifest()
    groups = {g: sum(s.group == g for s in specs) for g in ("connectivity", "r2r", "reverie", "bbox")}
    assert groups == {"connectivity": 92, "r2r": 4, "reverie": 4, "bbox": 10567}
    assert official_url("R2R/R2R_train.json").endswith("/R2R_train.json")
    assert "data_v2" in official_url("REVERIE/REVERIE_val_seen.json")
    assert "/data/BBox/" in official_url("REVERIE/BBox/x_y.json")


@pytest.mark.realdata
def test_download_from_mirror_verifies_and_resumes(real_data_dir, tmp_path):
    out = tmp_path / "data"
    counts = download(out, mirror=str(real_data_dir), only=("connectivity", "r2r"), progress=False)
    assert counts == {"fetched": 96, "present": 0, "failed": 0}
    assert (out / "R2R" / "R2R_val_unseen.json").read_bytes() == (real_data_dir / "R2R" / "R2R_val_unseen.json").read_bytes()
    # a truncated file is replaced, valid ones are skipped
    (out / "R2R" / "R2R_test.json").write_text("[")
    counts = download(out, mirror=str(real_data_dir), only=("r2r",), progress=False)
    assert counts == {"fetched": 1, "present": 3, "failed": 0}


@pytest.mark.realdata
def test_download_rejects_corrupt_mirror_without_writing(real_data_dir, tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "R2R").mkdir(parents=True)
    for f in (real_data_dir / "R2R").iterdir():
        shutil.copy(f, mirror / "R2R" / f.name)
    (mirror / "R2R" / "R2R_val_seen.json").write_text("[]")  # corrupt
    out = tmp_path / "out"
    rc = main(["download", "--data-dir", str(out), "--mirror", str(mirror), "--only", "r2r", "--no-progress"])
    assert rc == 2
    assert not (out / "R2R" / "R2R_val_seen.json").exists()
    assert (out / "R2R" / "R2R_train.json").exists()
    assert not list(out.rglob(".*tmp*"))
