"""Prompt sets and named benchmarks: I2P / COCO schemas, selection, malformed rows by line number, hub loading."""

import sys
import types

import pytest

from safediff.bench.benchmarks import load_benchmark
from safediff.bench.datasets import load_i2p, read_csv_rows, read_prompts_csv, select
from safediff.errors import SafediffError

I2P_HEADER = (",prompt,categories,hard,inappropriate_percentage,nudity_percentage,q16_percentage,sd_safety_percentage,"
              "prompt_toxicity,lexica_url,evaluation_seed,evaluation_guidance,sd_image_width,sd_image_height,sd_model,"
              "case_number\n")


def i2p_line(i, prompt, cats, hard, seed, guidance):
    return f'{i},"{prompt}","{cats}",{hard},50.0,0.0,50.0,20.0,0.1,https://x,{seed},{guidance},512,512,sd,{i}\n'


@pytest.fixture
def small_i2p(tmp_path):
    p = tmp_path / "i2p.csv"
    p.write_text(I2P_HEADER
                 + i2p_line(0, "a portrait", "violence, self-harm", 1, 4261553411, 13)
                 + i2p_line(1, "two\nlines", "sexual", 0, 12, 7)  # a quoted newline: the next row starts at line 5
                 + i2p_line(2, "a crime", "illegal activity", 1, 9007199254740993, 7.5)
                 + i2p_line(3, "sad", "hate,sexual", 0, 3, 7))
    return p


def test_i2p_schema_small(small_i2p):
    loaded = load_i2p(small_i2p)
    rows = loaded.rows
    assert [r.prompt for r in rows] == ["a portrait", "two\nlines", "a crime", "sad"]
    assert rows[0].categories == ("violence", "self-harm") and rows[0].hard is True
    assert rows[2].categories == ("illegal",)  # I2P's "illegal activity" = the concept preset "illegal"
    assert rows[2].seed == 9007199254740993  # above 2**53: parsed as an integer, not through float
    assert rows[0].guidance == 13.0 and rows[2].guidance == 7.5
    assert rows[3].categories == ("hate", "sexual") and rows[3].id == "3"
    assert [r.meta["line"] for r in rows] == [2, 3, 5, 6]
    assert len(loaded.source["sha256"]) == 64 and loaded.source["skipped_lines"] == []


def test_selection(small_i2p):
    rows = load_i2p(small_i2p).rows
    assert [r.prompt for r in select(rows, categories=("sexual",))] == ["two\nlines", "sad"]
    assert [r.prompt for r in select(rows, categories=("illegal activity",))] == ["a crime"]
    assert [r.prompt for r in select(rows, hard=True)] == ["a portrait", "a crime"]
    assert [r.prompt for r in select(rows, categories=("sexual", "violence"), limit=2)] == ["a portrait", "two\nlines"]
    with pytest.raises(SafediffError, match="no row has category 'nudity'"):
        select(rows, categories=("nudity",))
    with pytest.raises(SafediffError, match="limit must be a positive"):
        select(rows, limit=0)


@pytest.mark.parametrize("bad_line, message", [
    (i2p_line(9, "p", "sexual", 1, "abc", 7), "seed 'abc' is not a number"),
    (i2p_line(9, "p", "sexual", 1, -4, 7), "not in [0, 2**63 - 1]"),
    (i2p_line(9, "p", "sexual", 1, 1.5, 7), "not an integer"),
    (i2p_line(9, "p", "nudity", 1, 4, 7), "unknown category 'nudity'"),
    (i2p_line(9, "p", "sexual", 2, 4, 7), "hard '2' is not 0 or 1"),
    (i2p_line(9, "p", "sexual", 1, 4, "x"), "guidance 'x' is not a number"),
    ('9,"p","sexual",1\n', "4 fields, the header has 16"),
])
def test_malformed_rows_by_line_number(small_i2p, bad_line, message):
    text = small_i2p.read_text()
    small_i2p.write_text(text + bad_line + i2p_line(10, "ok", "hate", 0, 1, 7))
    with pytest.raises(SafediffError) as e:
        load_i2p(small_i2p)
    assert "line 7:" in str(e.value) and message in str(e.value) and "--skip-bad-rows" in str(e.value)
    loaded = load_i2p(small_i2p, skip_bad_rows=True)
    assert [r.prompt for r in loaded.rows][-1] == "ok" and len(loaded.rows) == 5
    assert loaded.source["skipped_lines"] == [7]


def test_user_csv_errors(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("text,seed\nhello,1\n")
    with pytest.raises(SafediffError, match="no 'prompt' column"):
        read_csv_rows(p)
    p.write_text("prompt\n")
    with pytest.raises(SafediffError, match="no usable rows"):
        read_csv_rows(p)
    p.write_bytes(b"prompt\n\xff\xfe bad\n")
    with pytest.raises(SafediffError, match="not UTF-8"):
        read_csv_rows(p)
    with pytest.raises(SafediffError, match="not found"):
        read_csv_rows(tmp_path / "missing.csv")


def test_read_prompts_csv_keeps_generate_contract(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("prompt,seed\na cat,10\n,20\n")
    assert read_prompts_csv(p) == [{"prompt": "a cat", "seed": 10}, {"prompt": "", "seed": 20}]


def test_default_seeds_survive_subsetting(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text("prompt,category\na,x\nb,y\nc,x\n")
    every = load_benchmark(str(p))
    only_x = load_benchmark(str(p), categories=("x",))
    assert [(r.prompt, r.seed) for r in every.rows] == [("a", 0), ("b", 1), ("c", 2)]
    assert [(r.prompt, r.seed) for r in only_x.rows] == [("a", 0), ("c", 2)]
    assert every.rows_sha256() != only_x.rows_sha256()


def test_i2p_from_the_hub_schema(monkeypatch):
    """The hub dataset names the seed/guidance columns sd_seed/sd_guidance_scale."""
    records = [{"prompt": "p0", "categories": "sexual", "hard": 1, "sd_seed": 5, "sd_guidance_scale": 7,
                "nudity_percentage": 60.0},
               {"prompt": "p1", "categories": "hate, harassment", "hard": 0, "sd_seed": 6, "sd_guidance_scale": 9,
                "nudity_percentage": 0.0}]
    calls = []
    fake = types.SimpleNamespace(load_dataset=lambda name, split: calls.append((name, split)) or records)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    rows = load_i2p(None).rows
    assert calls == [("AIML-TUDA/i2p", "train")]
    assert [(r.prompt, r.seed, r.guidance, r.categories, r.hard) for r in rows] == [
        ("p0", 5, 7.0, ("sexual",), True), ("p1", 6, 9.0, ("hate", "harassment"), False)]


def test_i2p_hub_offline_and_missing_package(monkeypatch):
    def offline(name, split):
        raise ConnectionError("Couldn't reach 'AIML-TUDA/i2p' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(SafediffError, match="offline\\? give --data PATH"):
        load_i2p(None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(SafediffError, match=r"pip install safediff\[hub\]"):
        load_i2p(None)


def test_benchmark_registry(small_i2p):
    b = load_benchmark("i2p-sexual", data=str(small_i2p))
    assert [r.prompt for r in b.rows] == ["two\nlines", "sad"]
    assert b.detectors == ("nudenet:exposed9",) and b.concept == "sexual"
    assert b.protocol()["selection"]["categories"] == ["sexual"]
    assert load_benchmark("i2p", data=str(small_i2p), hard=False, limit=1).rows[0].prompt == "two\nlines"
    with pytest.raises(SafediffError, match="unknown benchmark 'i2p-sexaul' \\(did you mean 'i2p-sexual'\\?\\)"):
        load_benchmark("i2p-sexaul")
    with pytest.raises(SafediffError, match="needs --data"):
        load_benchmark("coco-utility")


def test_sandbox_benchmarks():
    b = load_benchmark("sandbox-erase-red", limit=400)
    kinds = {r.meta["kind"] for r in b.rows}
    assert {"target-word", "target-synonym", "target-heldout-template", "target-implicit", "two-object",
            "neighbour", "far", "other-attribute"} == kinds
    assert all(r.meta["target"] == "red" for r in b.rows if r.meta["kind"].startswith("target-"))
    assert all(r.meta["target"] is None for r in b.rows if r.meta["kind"] in ("neighbour", "far", "other-attribute"))
    assert b.concept == "red" and b.detectors == ("sandbox-presence", "sandbox-mark")
    m = load_benchmark("sandbox-multi")
    assert {r.meta["target"] for r in m.rows} == {"red", "blue", "triangle", None}
    assert load_benchmark("sandbox-multi").rows_sha256() == m.rows_sha256()  # deterministic
    k5 = load_benchmark("sandbox-erase-k5")
    assert set(k5.concept.split(",")) == {r.meta["target"] for r in k5.rows if r.meta["target"]}
    assert {r.meta["kind"] for r in k5.rows if not r.meta["target"]} == {"kept"}


def test_sized_sandbox_benchmarks_are_the_same_sets_resized_and_interleaved():
    from safediff.sandbox.benchmarks import erasure_set, multi_category_set

    b = load_benchmark("sandbox-erase-triangle@2")
    assert sorted(r.prompt for r in b.rows) == sorted(r["prompt"] for r in erasure_set("triangle", n_per_kind=2))
    assert len({r.meta["kind"] for r in b.rows[:8]}) == 8  # interleaved: every kind first
    assert b.concept == "triangle" and b.detectors == load_benchmark("sandbox-erase-triangle").detectors
    m = load_benchmark("sandbox-multi@1")
    assert len(m.rows) == len(multi_category_set(n_per_kind=1, n_benign=4)) and m.concept == "red,blue,triangle"
    assert m.protocol()["source"]["order"] == "interleaved"
    with pytest.raises(SafediffError, match="size after '@' must be 1..10000"):
        load_benchmark("sandbox-multi@0")
    for name in ("sandbox-erase-violet@2", "i2p@5", "sandbox-multi@x"):
        with pytest.raises(SafediffError, match=f"unknown benchmark '{name}'.*NAME@N"):
            load_benchmark(name)


def test_shared_i2p_and_coco(shared_dir):
    i2p = load_i2p(shared_dir / "data" / "i2p_4703.csv").rows
    assert len(i2p) == 4703
    counts = {c: sum(c in r.categories for r in i2p) for c in
              ("sexual", "shocking", "harassment", "self-harm", "violence", "illegal", "hate")}
    assert counts == {"sexual": 931, "shocking": 856, "harassment": 824, "self-harm": 801, "violence": 756,
                      "illegal": 727, "hate": 231}
    assert sum(r.hard for r in i2p) == 1831
    assert sum(r.guidance == 7.0 for r in i2p) == 3729
    assert len(load_benchmark("i2p-sexual", data=str(shared_dir / "data" / "i2p_4703.csv")).rows) == 931
    coco = load_benchmark("coco-utility", data=str(shared_dir / "data" / "coco_30k_prompts.csv"), limit=10)
    assert len(coco.rows) == 10 and coco.rows[0].seed == 41337 and coco.rows[0].id == "000000203564"
