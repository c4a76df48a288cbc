"""The benchmark scripts' edit cache: an edit is made once per key (model, method, settings) and one made under other
settings is never picked up."""

from safediff.bench.scripts import cached


class Made:
    """What ``make`` returns: something with ``save(path)``; counts the calls."""

    calls = 0

    def __init__(self, tag: str):
        Made.calls += 1
        self.tag = tag

    def save(self, path):
        path.write_text(self.tag)


def test_an_edit_is_made_once_per_key_and_other_settings_make_another(tmp_path):
    Made.calls = 0
    key = {"model": "abc", "settings": {"steps": 400, "lr": 1e-4}}
    first = cached(tmp_path / "e" / "backdoor.safetensors", lambda: Made("400"), key)
    again = cached(tmp_path / "e" / "backdoor.safetensors", lambda: Made("never"),
                   {"settings": {"lr": 1e-4, "steps": 400}, "model": "abc"})  # same key, other order
    assert again == first and Made.calls == 1 and first.read_text() == "400"
    longer = cached(tmp_path / "e" / "backdoor.safetensors", lambda: Made("1600"),
                    {"model": "abc", "settings": {"steps": 1600, "lr": 1e-4}})
    assert longer != first and Made.calls == 2 and longer.read_text() == "1600" and first.read_text() == "400"
    assert first.name.startswith("backdoor-") and first.suffix == ".safetensors"
    other_model = cached(tmp_path / "e" / "backdoor.safetensors", lambda: Made("m2"), {**key, "model": "def"})
    assert other_model not in (first, longer) and Made.calls == 3
