"""``Edit``: what an eraser produces. New values for the parameters it changed, plus a record of how it was made.

Parameter names carry their component: ``unet.…`` or ``transformer.…`` (the denoiser), ``text_encoder.…``,
``text_encoder_2.…``, ``text_encoder_3.…`` (``vae.…`` too).
An edit is tied to the weights it was computed on: ``base_weights_sha256`` (``Model.base_sha256``, the weights as
loaded) and ``parents``, the digests of the edits that were already applied when it was fitted. ``apply`` checks both,
so a stack ``SPEC+A+B`` is reproduced only in the order it was made, and ``revert`` undoes edits in reverse order,
restoring the exact bytes of the weights.

On disk an edit is one safetensors file: the tensors, and the metadata (a record of kind ``edit``,
``safediff.records``) as JSON under the header key ``safediff_edit``, including ``edit_sha256``, the digest of the
tensors, which ``load`` verifies: a flipped byte in a tensor is refused. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from safediff.errors import SafediffError
from safediff.hashing import tensors_sha256
from safediff.identity import ByIdentity
from safediff.records import SCHEMA_VERSION, check_record

HEADER_KEY = "safediff_edit"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def split_name(name: str) -> tuple[str, str]:
    component, _, rest = name.partition(".")
    if component not in COMPONENTS or not rest:
        raise SafediffError(f"edit parameter '{name}' has no component prefix; accepted prefixes: "
                            + ", ".join(f"{c}." for c in COMPONENTS))
    return component, rest


def resolve_parameter(model, name: str) -> torch.nn.Parameter:
    """``"unet.down_blocks.0….to_k.weight"`` -> that parameter of ``model``; SafediffError if it has none."""
    component, rest = split_name(name)
    module = getattr(model.pipe, component, None)
    if not isinstance(module, torch.nn.Module):
        raise SafediffError(f"edit changes '{name}' but this model has no {component}")
    try:
        return module.get_parameter(rest)
    except AttributeError:
        raise SafediffError(f"edit changes '{name}', which this model's {component} does not have "
                            "(edit made for another architecture?)") from None


def changed_tensors(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``tensors`` (cast to the model's dtype for each) that differ from ``model``'s current values:
    what an edit of them must hold."""
    out = {}
    for name, t in tensors.items():
        current = resolve_parameter(model, name)
        t = t.to(dtype=current.dtype)
        if not torch.equal(t.to(current.device), current.detach()):
            out[name] = t
    return out


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, by name: the identity of an edit's content."""
    return tensors_sha256((name, tensors[name]) for name in sorted(tensors))


class Edit:
    """Parameter name -> new tensor (only what changed), and the metadata that says how it was made."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict):
        for name in tensors:
            split_name(name)
        if not metadata.get("base_weights_sha256"):
            raise SafediffError("edit metadata lacks base_weights_sha256 (the hash of the model it was made for)")
        self.tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        bad = [k for k, v in self.tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise SafediffError(f"the edit has non-finite values (NaN/inf) in {len(bad)} tensor(s), e.g. '{bad[0]}'; "
                                "it is refused (a learning rate or scale too large?)")
        self.digest = tensors_digest(self.tensors)
        metadata = {"kind": "edit", "schema_version": SCHEMA_VERSION, "parents": [], **metadata,
                    "edit_sha256": self.digest}
        self.metadata = json.loads(json.dumps(metadata, default=str))  # exactly what a saved file reads back
        self._originals: ByIdentity[dict[str, torch.Tensor]] = ByIdentity()  # model -> tensors replaced by apply

    @property
    def method(self) -> str:
        return str(self.metadata.get("method", "?"))

    def protocol(self) -> dict:
        """The metadata, plus the content digest and what is changed (recorded with every result)."""
        return {**self.metadata, "parameters_changed": len(self.tensors),
                "elements_changed": sum(t.numel() for t in self.tensors.values())}

    def __repr__(self) -> str:
        return f"Edit({self.method}, {len(self.tensors)} tensors, {self.digest[:12]})"

    # apply / revert -----------------------------------------------------------------------------------------
    def is_applied(self, model) -> bool:
        return any(e is self for e in model.edits)

    def _parameters_to_replace(self, model) -> dict[str, torch.nn.Parameter]:
        """The parameters of ``model`` this edit replaces, after checking that it fits there now: same base weights,
        not applied yet, the same parent edits applied, the same shapes."""
        base = model.base_sha256  # read before any weight changes (computed on first use)
        want = self.metadata["base_weights_sha256"]
        if base != want:
            raise SafediffError(f"edit made for another base model ({self.method} edit expects weights sha256 "
                                f"{want[:12]}…, this model has {base[:12]}…; load the same weights and dtype)")
        if self.is_applied(model):
            raise SafediffError(f"this {self.method} edit is already applied to the model")
        have = [e.digest for e in model.edits]
        need = list(self.metadata.get("parents", []))
        if have != need:
            raise SafediffError(f"this {self.method} edit was made on top of {len(need)} other edit(s) "
                                f"{[d[:12] for d in need]}, but the model carries {[d[:12] for d in have]}; "
                                "apply the same edits first, in the same order (SPEC+EDIT1+EDIT2)")
        params = {name: resolve_parameter(model, name) for name in self.tensors}
        for name, p in params.items():
            t = self.tensors[name]
            if p.shape != t.shape:
                raise SafediffError(f"edit tensor '{name}' has shape {tuple(t.shape)}, the model's has "
                                    f"{tuple(p.shape)} (edit made for another architecture?)")
        return params

    def deltas(self, model) -> dict[str, torch.Tensor]:
        """New minus current value of every tensor this edit changes, on the model's device in float32, for a model
        it could be applied to now (checked as ``apply`` checks); the model is not changed."""
        params = self._parameters_to_replace(model)
        return {name: self.tensors[name].to(p.device, torch.float32) - p.detach().float()
                for name, p in params.items()}

    def apply(self, model) -> "Edit":
        """Write the new tensors into ``model`` in place; keep the replaced ones for ``revert``."""
        params = self._parameters_to_replace(model)
        originals = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.tensors[name].to(device=p.device, dtype=p.dtype))
        self._originals[model] = originals
        model.edits.append(self)
        return self

    def revert(self, model) -> None:
        """Restore the exact tensors ``apply`` replaced. Edits must be reverted last-applied first."""
        if not self.is_applied(model):
            raise SafediffError(f"this {self.method} edit is not applied to the model; nothing to revert")
        if model.edits[-1] is not self:
            raise SafediffError(f"revert edits in reverse order: the last applied edit is {model.edits[-1]!r}, "
                                f"not {self!r}")
        originals = self._originals.pop(model)
        with torch.no_grad():
            for name, t in originals.items():
                resolve_parameter(model, name).copy_(t)
        model.edits.pop()

    def originals(self, model) -> dict[str, torch.Tensor]:
        """The tensors this edit replaced in ``model`` (it must be applied there)."""
        if not self.is_applied(model):
            raise SafediffError(f"this {self.method} edit is not applied to the model")
        return self._originals[model]

    # files --------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, exclusive: bool = False) -> Path:
        """Write the edit as safetensors (metadata JSON in the header), atomically; ``exclusive``: never replace an
        existing file (``FileExistsError``)."""
        from safetensors.torch import save

        from safediff.storage import write_bytes_atomic

        path = Path(path)
        header = {HEADER_KEY: json.dumps(self.metadata, sort_keys=True, default=str)}
        write_bytes_atomic(path, save({k: v.contiguous() for k, v in self.tensors.items()}, metadata=header),
                           exclusive=exclusive)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Edit":
        """Read an edit written by ``save``. A missing, corrupt, truncated or foreign file -> SafediffError."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise SafediffError(f"edit file '{path}' not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for every malformed file
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise SafediffError(f"'{path}' is not a readable edit (corrupt or truncated safetensors: {reason})"
                                ) from None
        if HEADER_KEY not in header:
            raise SafediffError(f"'{path}' is a safetensors file without safediff edit metadata; edits are "
                                "written by `safediff erase` or Edit.save")
        try:
            metadata = json.loads(header[HEADER_KEY])
        except json.JSONDecodeError:
            raise SafediffError(f"'{path}' has corrupt edit metadata (invalid JSON)") from None
        check_record(metadata, ("edit",), str(path))
        edit = cls(tensors, metadata)
        if edit.digest != metadata.get("edit_sha256"):
            raise SafediffError(f"'{path}' is damaged: its tensors do not match the digest stored with them")
        return edit

    def export_folder(self, model, out: str | Path) -> Path:
        """Write ``model`` with this edit applied as a full diffusers folder (safetensors weights), atomically.

        The model is left as it was: the edit is applied for the export and reverted afterwards unless it was
        already applied. The folder also holds ``safediff_edit.json`` (sampler defaults and the edits' records).
        """
        from safediff.storage import staged_folder, write_json_atomic

        applied_here = not self.is_applied(model)
        try:
            with staged_folder(out) as tmp:
                if applied_here:
                    self.apply(model)
                model.pipe.save_pretrained(str(tmp), safe_serialization=True)
                write_json_atomic(tmp / "safediff_edit.json", {"defaults": model.defaults, "model": model.protocol()})
        finally:
            if applied_here and self.is_applied(model):
                self.revert(model)
        return Path(out)

    def export_text_encoders(self, model, out: str | Path) -> Path:
        """Write the text encoder(s) this edit changes, with it applied to ``model``, as transformers folders
        ``OUT/text_encoder`` (and ``OUT/text_encoder_2``), safetensors, with their tokenizers beside them
        (``OUT/tokenizer``...): the layout the AdvUnlearn authors release, so the robust encoder plugs into any
        pipeline that shares it (``CLIPTextModel.from_pretrained(OUT, subfolder="text_encoder")``). Atomic; the
        model is left as it was. ``OUT/safediff_edit.json`` holds the edit's record."""
        from safediff.storage import staged_folder, write_json_atomic

        components = sorted({split_name(n)[0] for n in self.tensors if split_name(n)[0].startswith("text_encoder")})
        if not components:
            raise SafediffError(f"this {self.method} edit changes no text encoder; export_folder writes the whole "
                                "pipeline")
        applied_here = not self.is_applied(model)
        try:
            with staged_folder(out) as tmp:
                if applied_here:
                    self.apply(model)
                for component in components:
                    getattr(model.pipe, component).save_pretrained(str(tmp / component), safe_serialization=True)
                    tokenizer = component.replace("text_encoder", "tokenizer")
                    getattr(model.pipe, tokenizer).save_pretrained(str(tmp / tokenizer))
                write_json_atomic(tmp / "safediff_edit.json", {"edit": self.protocol(), "components": components})
        finally:
            if applied_here and self.is_applied(model):
                self.revert(model)
        return Path(out)

    def export_lora(self, path: str | Path, rank: int | None = None, model=None) -> dict:
        """Write the weight deltas as a diffusers-format LoRA (see ``safediff.edits.lora``); return its report.

        The deltas need the weights the edit replaced: those of the model it is applied to, or of ``model`` (the
        base it was made for, with the same parent edits applied).
        """
        from safediff.edits.lora import export_lora

        if model is None:
            if len(self._originals) != 1:
                raise SafediffError("export_lora needs the base weights: apply the edit to its model first, or "
                                    "pass model=")
            originals = next(iter(self._originals.values()))
        elif self.is_applied(model):
            originals = self.originals(model)
        else:
            if model.base_sha256 != self.metadata["base_weights_sha256"] or \
                    [e.digest for e in model.edits] != list(self.metadata.get("parents", [])):
                raise SafediffError("export_lora: the given model is not the one this edit was made for")
            originals = {name: resolve_parameter(model, name).detach() for name in self.tensors}
        return export_lora(self.tensors, originals, path, rank=rank, metadata=self.protocol())
