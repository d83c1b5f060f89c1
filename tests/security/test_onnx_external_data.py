"""THREATS.md E6: an ONNX model whose tensors keep their data outside the package is refused
at verification, before any runtime opens it, so no out-of-package file is read.

The models are real ONNX files made with the ``onnx`` package: ``y = x + W`` with ``W`` stored
as external data. With ``W`` in a signed file of the package the model installs and serves;
pointed anywhere else (``..``, an absolute path, a link, a file the manifest does not list, or
from deep inside a subgraph or a node attribute) the whole package is refused.
"""

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import _get_all_tensors

from agent.archive import ArchiveLimits
from agent.errors import ModelLoadError, RejectedError
from agent.external_data import external_locations
from agent.install import ModelStore, TrustContext
from agent.protocol.canonical import canonical_bytes
from agent.protocol.documents import DetachedSignatures, Manifest, document_dict
from agent.protocol.messages import Reason
from agent.runtimes import load_runtime
from agent.runtimes.base import Runtime
from agent.runtimes.health import check_health
from tests.security.conftest import tree
from tests.support.package_simulator import PackageRepoSimulator

WEIGHTS = np.arange(4, dtype=np.float32).reshape(1, 4)
# From <device>/models/iris/<version dir>/files, four levels up is <device>.
SECRET_RELATIVE = "../../../../keys/device.key"


def _external(name: str, location: str) -> TensorProto:
    tensor = numpy_helper.from_array(WEIGHTS, name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _model(location: str, *, hide_in: str | None = None) -> bytes:
    """``y = x + W``; ``hide_in`` puts a second external tensor with ``location`` inside an
    If node's subgraph or a Constant node's attribute, while ``W`` itself stays honest."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Add", ["x", "W"], ["y"])]
    w_location = location if hide_in is None else "weights.bin"
    if hide_in == "subgraph":
        z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
        branch = helper.make_graph(
            [helper.make_node("Identity", ["H"], ["z"])], "b", [], [z], [_external("H", location)]
        )
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        nodes.append(helper.make_node("Constant", [], ["cond"], value=cond))
        nodes.append(
            helper.make_node("If", ["cond"], ["unused"], then_branch=branch, else_branch=branch)
        )
    elif hide_in == "attribute":
        nodes.append(helper.make_node("Constant", [], ["k"], value=_external("K", location)))
    graph = helper.make_graph(nodes, "g", [x], [y], [_external("W", w_location)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _files(model: bytes, **extra: bytes) -> dict[str, bytes]:
    return {
        "model.onnx": model,
        "weights.bin": WEIGHTS.tobytes(),
        "sample_input.json": json.dumps([[0.0, 0.0, 0.0, 0.0]]).encode(),
        "expected_output.json": json.dumps({"y": WEIGHTS.tolist()}).encode(),
        **extra,
    }


def _package(
    sim: PackageRepoSimulator, files: dict[str, bytes], link: str | None = None
) -> tuple[bytes, Manifest]:
    """Signed by the release key; ``link`` makes ``weights.bin`` a symlink to it instead."""
    manifest = sim.manifest(files, version=2)
    doc = document_dict(manifest)
    sigs = DetachedSignatures(signatures=[sim.keys.sign_release(doc)])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        members = {
            "manifest.json": canonical_bytes(doc),
            "manifest.sig": canonical_bytes(document_dict(sigs)),
            **{f"files/{p}": d for p, d in files.items()},
        }
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if link is not None and name == "files/weights.bin":
                info.type, info.linkname = tarfile.SYMTYPE, link
                archive.addfile(info)
                continue
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), manifest


class Device:
    """A device with v1 of the iris model active, a secret beside its models, and a record
    of every model a runtime was asked to open."""

    def __init__(
        self, root: Path, sim: PackageRepoSimulator, iris: dict[str, bytes], trust: TrustContext
    ) -> None:
        self.root = root
        self.secret = root / "device" / "keys" / "device.key"
        self.secret.parent.mkdir(parents=True)
        self.secret.write_bytes(WEIGHTS.tobytes())  # readable as W: a leak would "work"
        self.opened: list[Path] = []
        self.store = ModelStore(
            root / "device" / "models",
            load_runtime=self._load,
            check_health=check_health,
            limits=ArchiveLimits(),
        )
        self.trust = trust
        v1 = sim.package(iris, version=1)
        self.install(v1.data, v1.ref)
        self.opened.clear()

    def _load(self, model_dir: Path, manifest: Manifest) -> Runtime:
        self.opened.append(model_dir)
        return load_runtime(model_dir, manifest)

    def install(self, data: bytes, ref: Any) -> Any:
        path = self.root / "incoming.tar"
        path.write_bytes(data)
        try:
            return self.store.install(path, ref, self.trust, lambda _: None)
        finally:
            path.unlink()


@pytest.fixture
def device(
    tmp_path: Path, sim: PackageRepoSimulator, files: dict[str, bytes], trust: TrustContext
) -> Device:
    return Device(tmp_path, sim, files, trust)


CASES: dict[str, Callable[[Path], tuple[dict[str, bytes], str | None]]] = {
    "dotdot": lambda secret: (_files(_model(SECRET_RELATIVE)), None),
    "absolute": lambda secret: (_files(_model(str(secret))), None),
    "symlink_in_package": lambda secret: (_files(_model("weights.bin")), str(secret)),
    "not_a_signed_file": lambda secret: (_files(_model("unlisted.bin")), None),
    "backslash": lambda secret: (_files(_model("..\\..\\keys\\device.key")), None),
    "in_a_subgraph": lambda secret: (_files(_model(SECRET_RELATIVE, hide_in="subgraph")), None),
    "in_an_attribute": lambda secret: (_files(_model(str(secret), hide_in="attribute")), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_model_reaching_outside_the_package_is_refused_before_it_is_opened(
    device: Device, sim: PackageRepoSimulator, case: str
) -> None:
    files, link = CASES[case](device.secret)
    data, manifest = _package(sim, files, link)
    before = tree(device.root)
    with pytest.raises(RejectedError) as info:
        device.install(data, sim.ref_for(data, manifest))
    assert info.value.reason is Reason.UNSAFE_PATH, info.value
    assert device.opened == [], "a runtime opened the model: it may have read outside"
    assert tree(device.root) == before, "the refused package left files behind"
    assert device.store.pointer("iris").version == 1  # type: ignore[union-attr]


def test_external_data_inside_the_package_installs_and_serves(
    device: Device, sim: PackageRepoSimulator
) -> None:
    """The check refuses what escapes, not external data as such."""
    data, manifest = _package(sim, _files(_model("weights.bin")))
    active = device.install(data, sim.ref_for(data, manifest))
    assert active.runtime.predict([[1.0, 1.0, 1.0, 1.0]])["y"].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    assert device.store.pointer("iris").version == 2  # type: ignore[union-attr]


@pytest.mark.parametrize("hide_in", [None, "subgraph", "attribute"])
def test_the_locations_read_from_the_wire_format_are_the_ones_onnx_finds(
    tmp_path: Path, hide_in: str | None
) -> None:
    raw = _model(str(tmp_path / "x.bin"), hide_in=hide_in)
    path = tmp_path / "m.onnx"
    path.write_bytes(raw)
    model = onnx.load_model(str(path), load_external_data=False)
    expected = {
        entry.value
        for tensor in _get_all_tensors(model)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert len(expected) == (1 if hide_in is None else 2)
    assert set(external_locations(raw)) == expected


def test_the_iris_model_names_no_external_data_and_garbage_is_a_load_error(
    files: dict[str, bytes],
) -> None:
    assert external_locations(files["model.onnx"]) == []
    # Not protobuf; a field longer than the file; a graph cut short.
    for garbage in (b"not an onnx model", b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05ab"):
        with pytest.raises(ModelLoadError):
            external_locations(garbage)
