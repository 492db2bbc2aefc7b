"""Teacher outputs reused across trials of one process (trials.teacher_cache): identical losses, never another
teacher's or batch's outputs, the memory bound, the float16 disk tier."""
import pytest
import torch

from trials.teacher_cache import TeacherCache, TeacherOutputs, teacher_identity
from trials.trial import clear_caches, run_trial


def _lm_config(teacher, corpus, **over):
    cfg = {
        "teacher": str(teacher),
        "plan": {"rules": [{"select": "h.*.mlp.c_fc", "shape": [64, 16, 2, 2]},
                           {"select": "attn.c_attn", "layers": "odd", "shape": [16, 16, 2, 2], "blocks": 3}]},
        "data": {"source": str(corpus), "seq_len": 16, "val_blocks": 4},
        # logits KD on, so the cached logits are exercised as well as hidden states and attention maps
        "stage1": {"lr": 3e-3, "batch_size": 4, "max_steps": 6, "eval_every": 3, "early_stopping": None,
                   "distill": {"emb": 0.5, "att": 0.5, "hid": 0.5, "ce": 0.1, "logits": 1.0}},
        "save_checkpoint": False, "threads": 1, "device": "cpu", "seed": 0,
    }
    cfg.update(over)
    return cfg


LOSS_KEYS = ("loss", "loss_emb", "loss_att", "loss_hid", "loss_ce", "loss_logits", "quality")


def _losses(summary):
    return [tuple(h.get(k) for k in LOSS_KEYS) for h in summary["history"]]


def test_reused_teacher_outputs_give_identical_losses(tiny_lm_teacher, text_corpus):
    clear_caches()
    plain = run_trial(_lm_config(tiny_lm_teacher, text_corpus, teacher_cache=False))
    assert plain["teacher_batches"] == {"reused": 0, "computed": 6}
    clear_caches()
    first = run_trial(_lm_config(tiny_lm_teacher, text_corpus))  # fills the cache
    second = run_trial(_lm_config(tiny_lm_teacher, text_corpus, name="again"))  # a later trial on the same worker
    assert first["teacher_batches"] == {"reused": 0, "computed": 6}
    assert second["teacher_batches"] == {"reused": 6, "computed": 0}
    assert _losses(first) == _losses(plain)  # exactly, not approximately
    assert _losses(second) == _losses(plain)
    assert second["train_step_s"] > 0
    clear_caches()


def test_other_data_or_sequence_length_is_never_served(tiny_lm_teacher, text_corpus):
    clear_caches()
    run_trial(_lm_config(tiny_lm_teacher, text_corpus))
    longer = _lm_config(tiny_lm_teacher, text_corpus)
    longer["data"] = {**longer["data"], "seq_len": 24}
    other = run_trial(longer)
    assert other["teacher_batches"] == {"reused": 0, "computed": 6}
    reseeded = run_trial(_lm_config(tiny_lm_teacher, text_corpus, seed=1))  # other batches (shuffled differently)
    assert reseeded["teacher_batches"]["computed"] >= 5
    clear_caches()


def _outputs(seed=0, batch=2, length=5, width=4, with_logits=True):
    g = torch.Generator().manual_seed(seed)
    return TeacherOutputs(tuple(torch.randn(batch, length, width, generator=g) for _ in range(3)),
                          tuple(torch.softmax(torch.randn(batch, 2, length, length, generator=g), -1)
                                for _ in range(2)),
                          torch.randn(batch, length, 7, generator=g) if with_logits else None)


def _ids(length=5, shift=0):
    return (torch.arange(2 * length).view(2, length) + shift) % 11


def test_keys_separate_teachers_batches_masks_lengths_and_logits():
    cache = TeacherCache()
    cache.configure(memory_mb=16)
    computed = []

    def get(ctx, ids, mask=None, keep_logits=True, seed=0):
        def compute():
            computed.append(1)
            return _outputs(seed, length=ids.shape[1], with_logits=keep_logits)

        return cache.get_or_compute(ctx, ids, mask, compute, keep_logits)

    a = get("A", _ids())
    assert get("A", _ids()) is a and len(computed) == 1  # a hit returns what was computed, not a copy
    get("B", _ids())  # another teacher
    get("A", _ids(shift=1))  # another batch
    get("A", _ids(), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))  # same ids, another mask
    get("A", _ids().clone())  # the same content in another tensor: a hit
    get("A", torch.cat([_ids(), _ids()[:, :1]], 1))  # a longer sequence with the same prefix
    get("A", _ids(), keep_logits=False)  # the entry kept logits for another need: kept apart
    assert len(computed) == 6
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 6


def test_teacher_identity_changes_with_an_in_place_weight_update(tiny_gpt2):
    key = ("demo", "auto", "cpu", "float32", False)
    before = teacher_identity(key, tiny_gpt2)
    assert teacher_identity(key, tiny_gpt2) == before
    with torch.no_grad():
        next(tiny_gpt2.parameters()).add_(1.0)
    assert teacher_identity(key, tiny_gpt2) != before


def test_memory_bound_keeps_the_first_batches_and_drops_other_teachers_first():
    size = _outputs().nbytes()
    cache = TeacherCache()
    cache.configure(memory_mb=3.5 * size / (1 << 20))  # room for 3 entries

    def get(ctx, i):
        return cache.get_or_compute(ctx, _ids(shift=i), None, lambda: _outputs(i), True)

    for i in range(5):  # a trial walks 5 batches: the first 3 are kept, the last 2 recomputed (no thrashing)
        get("A", i)
    assert cache.stats()["memory_entries"] == 3
    for i in range(5):  # the next trial: hits on the first 3 again
        get("A", i)
    assert cache.stats()["hits"] == 3
    get("B", 0)  # another teacher: room is made by dropping A's entries, not by refusing B
    assert cache.memory.entries() == 1 and "A" not in cache.memory.groups
    cache.configure(memory_mb=0)  # shrinking drops what no longer fits
    assert cache.stats()["memory_mb"] == 0


def test_disk_tier_in_float16(tmp_path):
    cache = TeacherCache()
    cache.configure(memory_mb=0, disk_mb=16, disk_dir=str(tmp_path))
    exact = _outputs(3)
    cache.get_or_compute("A", _ids(), None, lambda: exact, True)
    files = list(tmp_path.rglob("*.pt"))
    assert len(files) == 1
    back = cache.get_or_compute("A", _ids(), None, lambda: pytest.fail("recomputed"), True)
    assert cache.stats()["disk_hits"] == 1
    for a, b in zip(exact.tensors(), back.tensors()):
        assert b.dtype == a.dtype
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)  # float16 rounding only
    cache.clear()
    assert not any(tmp_path.rglob("*.pt"))


def test_disk_spill_keeps_losses_close(tiny_lm_teacher, text_corpus, tmp_path):
    clear_caches()
    plain = run_trial(_lm_config(tiny_lm_teacher, text_corpus, teacher_cache=False))
    spill = {"memory_mb": 0, "disk_mb": 64, "disk_dir": str(tmp_path)}
    run_trial(_lm_config(tiny_lm_teacher, text_corpus, teacher_cache=spill))
    again = run_trial(_lm_config(tiny_lm_teacher, text_corpus, teacher_cache=spill))
    assert again["teacher_batches"] == {"reused": 6, "computed": 0}
    for a, b in zip(_losses(plain), _losses(again)):
        for x, y in zip(a, b):
            assert (x is None and y is None) or y == pytest.approx(x, rel=2e-2)
    clear_caches()
