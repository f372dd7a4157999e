"""records.budget: own spending, the lineage of the model folders a phase descends from (each once, never the base),
and no partial total when a parent's budget is unknown."""

import json

from flowopd.runtime.records import budget, run_record_path


def spending(images: int, cpu_s: float = 1.0) -> dict:
    return {"images": images, "forwards": 10 * images, "optimizer_steps": images // 4, "cpu_s": cpu_s}


def folder(tmp_path, name: str, phase: str, record: dict | None) -> str:
    """A model folder as far as budget() reads it: meta.json's phase and key, the run record beside it."""
    path = tmp_path / name
    path.mkdir()
    (path / "meta.json").write_text(json.dumps({"phase": phase, "sections_hash": f"key-{name}"}))
    if record is not None:
        run_record_path(path).write_text(json.dumps({"phase": phase} | record))
    return path


def test_a_total_counts_every_ancestor_once_and_never_the_base(tmp_path):
    base = folder(tmp_path, "base", "base", {"budget": budget(spending(0, 50.0), shared_base=True)})
    teachers = [folder(tmp_path, f"t{i}", "teacher", {"budget": budget(spending(8 * (i + 1)), [base])})
                for i in range(2)]
    merged = folder(tmp_path, "merge", "cold_start", {"budget": budget(spending(0, 0.5), teachers)})
    student = budget(spending(4, 2.0), [merged, *teachers, base])  # teachers reached twice: counted once
    assert set(student["lineage"]) == {"key-t0", "key-t1", "key-merge"}
    assert student["total"] == {"images": 4 + 8 + 16, "forwards": 40 + 80 + 160, "optimizer_steps": 1 + 2 + 4,
                                "cpu_s": 2.0 + 1.0 + 1.0 + 0.5}
    assert student["images"] == 4 and student["lineage"]["key-t1"]["phase"] == "teacher"


def test_a_parent_without_a_budget_leaves_the_total_unknown(tmp_path):
    old = folder(tmp_path, "old", "teacher", {"finished": "2025-01-01T00:00:00+00:00"})  # a record from before
    unrecorded = folder(tmp_path, "bare", "teacher", None)  # no run record at all
    for parents in ([old], [unrecorded]):
        result = budget(spending(4), parents)
        assert result["images"] == 4 and result["total"] is None and result["lineage"] is None
    child = folder(tmp_path, "child", "cold_start", {"budget": budget(spending(0), [old])})
    assert budget(spending(4), [child])["total"] is None  # unknown is inherited, never summed in part
    assert budget(None, [child]) is None  # own spending unknown (a resumed run without it): no budget
