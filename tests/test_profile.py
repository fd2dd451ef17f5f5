"""storm-profile writes the Figure-8 layout: rows per (frames, ratio), stage latencies, CSV and PNG.

No timing is asserted (benchmarks print figures, tests assert behaviour): only that compression
shrinks what the LLM reads and that every stage is measured."""

import csv

from storm_lightning.profile import main
from tests.conftest import ROOT


def test_profile_tiny_config(tmp_path):
    out = tmp_path / "profile.csv"
    main(["--config", str(ROOT / "conf/sft.yaml"), "--frames", "2", "8", "--ratios", "1", "4", "--repeats", "1",
          "--warmup", "0", "--decode-tokens", "2", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [(r["frames"], r["ratio"]) for r in rows] == [("2", "1"), ("8", "1"), ("8", "4")]  # 2 < 4: skipped
    by = {(r["frames"], r["ratio"]): r for r in rows}
    assert int(by["8", "1"]["visual_tokens"]) == 8 * 16 and int(by["8", "4"]["visual_tokens"]) == 2 * 16
    assert int(by["8", "4"]["llm_tokens"]) == int(by["8", "1"]["llm_tokens"]) - 6 * 16
    for r in rows:
        assert all(float(r[f"{s}_ms"]) > 0 for s in ("vision", "projector", "llm_prefill", "decode_per_token"))
        assert abs(sum(float(r[f"{s}_share"]) for s in ("vision", "projector", "compression", "llm_prefill")) - 1) < 0.01
    assert (tmp_path / "profile.png").stat().st_size > 1000
