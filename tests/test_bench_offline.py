"""benchmarks/bench_offline.py frees our engine before transformers loads: on a GPU both would not fit."""

import gc
import sys
import weakref
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_offline

import engine


class _Loaded(Exception):
    pass


def test_engine_is_gone_when_transformers_loads(monkeypatch, tmp_path):
    made, alive = [], []

    class Recorded(engine.LLM):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(weakref.ref(self.engine))

    def hf_load(*a, **kw):
        gc.collect()
        alive.extend(r for r in made if r() is not None)
        raise _Loaded

    monkeypatch.setattr(engine, "LLM", Recorded)
    monkeypatch.setattr(bench_offline, "hf_load", hf_load)
    with pytest.raises(_Loaded):
        bench_offline.main(["--preset", "tiny", "--paths", "ours-single", "hf-single", "--num-requests", "1",
                            "--input-len-range", "4", "8", "--output-len", "2", "--out", str(tmp_path), "--no-plot"])
    assert len(made) == 1 and not alive
