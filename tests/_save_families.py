"""The model families of the save / load tests, and the loader that runs in a fresh process.

``FAMILIES`` mirrors tests/test_methods_ir.py (MLP, VGG + BatchNorm, ResNet, user classes with ``torch.cat`` skips
and in-place ReLU, a channels-last flatten, ``nn.MultiheadAttention``, ``nn.TransformerEncoder``, hand-written
attention, SwiGLU + RMSNorm, Hugging Face BERT, ViT, GPT-2 and Llama with grouped-query attention): name ->
(factory, batch(generator), how a file of it is loaded: "pyfusion" (its own module tree), "user" (``factory=``),
"huggingface" (from the saved config)).

Run as a script (``python tests/_save_families.py manifest.json``) it loads every file the manifest lists in this
fresh process, with pickle made unusable (an audit hook refuses every ``pickle.find_class``; ``torch.load``,
``pickle.load(s)`` and ``pickle.Unpickler`` raise), runs each model on its saved inputs and writes the outputs
(safetensors) and a JSON report (module classes, a digest of every tensor, checksum status, or the error).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from _ir_families import families, run
from torch import nn

F64 = torch.float64


FAMILIES = families(8)


def class_name(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def module_classes(model: nn.Module) -> list[list[str]]:
    return [[p, class_name(m)] for p, m in model.named_modules(remove_duplicate=False)]


def tensor_digest(model: nn.Module) -> str:
    """sha256 over every state-dict entry (name, dtype, shape, bytes) and every non-persistent buffer."""
    h = hashlib.sha256()
    named = dict(model.state_dict())
    for path, m in model.named_modules(remove_duplicate=False):
        for n, b in m._buffers.items():
            if b is not None and n in m._non_persistent_buffers_set:
                named.setdefault(f"{path}.{n}" if path else n, b)
    for k in sorted(named):
        t = named[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


PICKLE_EVENTS: list[str] = []


def forbid_pickle() -> None:
    """Make every use of pickle an error in this process (and check that it is); every attempt is also recorded in
    ``PICKLE_EVENTS`` (an error caught by some ``except`` on the way cannot hide it)."""
    import _pickle
    import collections
    import pickle

    def audit(event: str, args: tuple) -> None:
        if event == "pickle.find_class":
            PICKLE_EVENTS.append(repr(args))
            raise RuntimeError(f"pickle is disabled in this process (find_class{args})")

    sys.addaudithook(audit)

    def forbidden(*args, **kwargs):
        PICKLE_EVENTS.append("load")
        raise RuntimeError("pickle / torch.load is disabled in this process")

    class NoUnpickler(pickle.Unpickler):  # a class still: modules imported later may subclass it
        def __init__(self, *args, **kwargs):
            PICKLE_EVENTS.append("Unpickler")
            forbidden()

    torch.load = forbidden
    pickle.load = pickle.loads = forbidden
    pickle.Unpickler = NoUnpickler
    try:
        _pickle.loads(_pickle.dumps(collections.OrderedDict()))
    except RuntimeError:
        PICKLE_EVENTS.clear()
        return
    raise AssertionError("the pickle guard does not fire")


def main(manifest_path: str) -> None:
    from safetensors.torch import load_file, save_file

    import pyfusion

    torch.set_num_threads(1)
    manifest = json.loads(Path(manifest_path).read_text())
    forbid_pickle()
    report = {}
    for case in manifest["cases"]:
        kind = FAMILIES[case["family"]][2]
        factory = FAMILIES[case["family"]][0] if kind == "user" else None
        try:
            model = pyfusion.load(case["file"], factory=factory)
            x = load_file(case["inputs"])["x"]
            ys = run(model, (x,))
            save_file({f"y{i}": y.contiguous() for i, y in enumerate(ys)}, case["outputs"])
            report[case["id"]] = {
                "classes": module_classes(model),
                "digest": tensor_digest(model),
                "checksum": model.fusion_checksum,
                "training": model.training,
                "layouts": {k: list(v) for k, v in getattr(model, "fusion_layouts", {}).items()},
                "pickle_events": list(PICKLE_EVENTS),
            }
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails on it
            report[case["id"]] = {"error": f"{type(exc).__name__}: {exc}"}
    Path(manifest["report"]).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
