"""The live progress lines name the search's own size axis (bytes, MACs, parameters excl. the output embedding),
and a callback pickled by an earlier release still prints."""
import io
import pickle
from types import SimpleNamespace

from search.progress import ProgressCallback


def _line(cb, result):
    cb.stream = io.StringIO()
    cb.on_trial_result(0, [], SimpleNamespace(trial_id="t1"), result)
    return cb.stream.getvalue()


RESULT = {"step": 20, "quality": 110.3, "params": 5_660_000, "params_excl_output_embedding": 3_480_000,
          "macs_per_token": 3_400_000, "bytes": 11_000_000, "compression_ratio": 1.53}


def test_the_line_and_the_buckets_follow_the_size_axis():
    kw = dict(quality_name="val_ppl", quality_mode="min", teacher_params=7_420_000, max_t=60)
    by_bytes = ProgressCallback(**kw, size_metric="bytes", teacher_size=21_300_000)
    assert "11.0 MB (1.53x)" in _line(by_bytes, RESULT) and "params" not in _line(by_bytes, RESULT)
    assert by_bytes._bucket(RESULT) == 5  # 11.0 of 21.3 MB
    excl = ProgressCallback(**kw, size_metric="params_excl_output_embedding", teacher_size=5_320_000)
    assert "3.48M params excl. output embedding" in _line(excl, RESULT) and excl._bucket(RESULT) == 6
    plain = ProgressCallback(**kw)
    assert "5.66M params" in _line(plain, RESULT) and plain._bucket(RESULT) == 7
    # a result without the axis' column falls back to parameters
    assert "5.66M params" in _line(by_bytes, {k: v for k, v in RESULT.items() if k != "bytes"})


def test_a_callback_pickled_without_the_size_axis_still_prints():
    cb = ProgressCallback(quality_name="val_ppl", quality_mode="min", teacher_params=7_420_000, max_t=60)
    state = cb.__getstate__()
    for k in ("size_metric", "teacher_size"):  # what an earlier release pickled
        state.pop(k)
    old = ProgressCallback.__new__(ProgressCallback)
    old.__dict__.update(state)
    restored = pickle.loads(pickle.dumps(old))
    assert "5.66M params" in _line(restored, RESULT) and restored._bucket(RESULT) == 7
