"""ONNX export: self-contained files, metadata and fingerprints, ORT parity, every failure path.

A tiny randomly initialised model (built small, saved with the checkpoint functions) is exported
with the real torch exporters and run in the real ONNX Runtime.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from model_fixtures import write_tiny_rig
from receiver_fixtures import LATENT, SIZE, VIEWS, make_tiny_model

from mvld.common.errors import ConfigError
from mvld.export.cli import EXIT_INVALID, EXIT_OK, EXIT_PARITY
from mvld.export.cli import main as export_main
from mvld.export.onnx_export import (
    GRAPHS,
    ExportOptions,
    ParityError,
    check_parity,
    export_model,
)
from mvld.export.onnx_files import (
    FINGERPRINT_KEY,
    onnx_fingerprint,
    onnx_metadata,
    ort_session,
    read_onnx,
)
from mvld.model.checkpoint import (
    load_mvld_model,
    save_autoencoder,
    save_mvld_model,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny checkpoint, a 3-camera dataset and a TorchScript-exporter export of all parts."""
    root = tmp_path_factory.mktemp("export")
    checkpoint = save_mvld_model(root / "model", make_tiny_model())
    data = write_tiny_rig(root / "data", count=8, size=48)
    out = root / "onnx"
    export_model(checkpoint, out, ExportOptions(exporter="torchscript", frames=data))
    return {"checkpoint": checkpoint, "data": data, "out": out, "root": root}


def test_every_part_is_one_self_contained_file_with_dynamic_batch(tiny: dict[str, Path]) -> None:
    for part, spec in GRAPHS.items():
        path = tiny["out"] / f"{part}.onnx"
        model = onnx.load_model(str(path), load_external_data=False)
        onnx.checker.check_model(model, full_check=True)
        assert not any(
            onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer
        )
        assert [i.name for i in model.graph.input] == list(spec.inputs)
        for graph_input in model.graph.input:
            batch = graph_input.type.tensor_type.shape.dim[0]
            assert batch.dim_param and not batch.HasField("dim_value"), part
        assert onnx_metadata(model)["mvld.opset"] == str(model.opset_import[0].version) == "18"


def test_metadata_carries_fingerprints_and_preprocessing(tiny: dict[str, Path]) -> None:
    model = load_mvld_model(tiny["checkpoint"])
    manifest = json.loads((tiny["out"] / "manifest.json").read_text())
    for part in GRAPHS:
        path = tiny["out"] / f"{part}.onnx"
        metadata = onnx_metadata(read_onnx(path))
        assert metadata["mvld.part"] == part
        assert metadata["mvld.encoder_fingerprint"] == model.fingerprint
        assert json.loads(metadata["mvld.preprocess"]) == model.preprocess.to_dict()
        beside = path.with_name(path.name + ".sha256").read_text().strip()
        assert metadata[FINGERPRINT_KEY] == beside == onnx_fingerprint(path)
        assert manifest["graphs"][part]["fingerprint"] == beside
    assert manifest["encoder_fingerprint"] == model.fingerprint


def test_onnx_runtime_matches_torch_at_other_batch_sizes(tiny: dict[str, Path]) -> None:
    model = load_mvld_model(tiny["checkpoint"])
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (5, 3, SIZE, SIZE)).astype(np.float32)
    latents = rng.standard_normal((7, LATENT)).astype(np.float32)
    x = rng.standard_normal((2, VIEWS, LATENT)).astype(np.float32)
    tau = rng.uniform(0, 1, (2, VIEWS)).astype(np.float32)
    cases = {
        "encoder": (model.autoencoder.encoder, {"images": images}),
        "decoder": (model.autoencoder.decoder, {"latents": latents}),
        "score_net": (model.score_net, {"x": x, "tau": tau}),
    }
    for part, (module, feeds) in cases.items():
        got = ort_session(str(tiny["out"] / f"{part}.onnx")).run(None, feeds)[0]
        with torch.no_grad():
            want = module(*(torch.from_numpy(a) for a in feeds.values())).numpy()
        assert got.shape == want.shape
        assert np.max(np.abs(got - want)) < 1e-4, part


def test_export_reports_the_measured_error(tiny: dict[str, Path]) -> None:
    graphs = json.loads((tiny["out"] / "manifest.json").read_text())["graphs"]
    for part in GRAPHS:
        assert 0 < graphs[part]["max_abs_error"] < 1e-4
        assert graphs[part]["parity_batches"][-1] == 1  # batch of one checked too


def test_zero_tolerance_fails_the_export_and_writes_nothing(tiny: dict[str, Path]) -> None:
    out = tiny["root"] / "strict"
    code = export_main(
        [
            "onnx",
            "--model",
            str(tiny["checkpoint"]),
            "--out",
            str(out),
            "--exporter",
            "torchscript",
            "--tolerance",
            "0",
            "--frames",
            str(tiny["data"]),
            "-q",
        ]
    )
    assert code == EXIT_PARITY
    assert not (out / "encoder.onnx").exists() and not (out / "manifest.json").exists()


def test_a_corrupted_graph_fails_the_parity_check(tiny: dict[str, Path]) -> None:
    model = load_mvld_model(tiny["checkpoint"])
    proto = read_onnx(tiny["out"] / "encoder.onnx")
    weight = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0  # one corrupted weight
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    images = np.random.default_rng(0).uniform(-1, 1, (4, 3, SIZE, SIZE)).astype(np.float32)
    with pytest.raises(ParityError, match="max abs error"):
        check_parity(
            proto.SerializeToString(),
            model.autoencoder.encoder,
            [(images,)],
            GRAPHS["encoder"],
            tolerance=1e-4,
        )
    with pytest.raises(ParityError, match="cannot load"):
        check_parity(
            b"not an onnx model",
            model.autoencoder.encoder,
            [(images,)],
            GRAPHS["encoder"],
            tolerance=1e-4,
        )


def test_an_edited_file_no_longer_matches_its_fingerprint(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    proto = read_onnx(tiny["out"] / "decoder.onnx")
    proto.graph.initializer[0].raw_data = bytes(len(proto.graph.initializer[0].raw_data))
    edited = tmp_path / "decoder.onnx"
    onnx.save_model(proto, str(edited))
    with pytest.raises(ConfigError, match="do not match the embedded fingerprint"):
        onnx_fingerprint(edited)


def test_bad_paths_give_clear_errors(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nothing"
    assert (
        export_main(["onnx", "--model", str(missing), "--out", str(tmp_path / "o")]) == EXIT_INVALID
    )
    assert f"{missing}.json does not exist" in capsys.readouterr().err
    (tmp_path / "fake.json").write_text('{"hello": 1}')
    (tmp_path / "fake.safetensors").write_bytes(b"")
    assert (
        export_main(["onnx", "--model", str(tmp_path / "fake"), "--out", str(tmp_path)])
        == EXIT_INVALID
    )
    assert "is not an MVLD checkpoint" in capsys.readouterr().err
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\xff\xff garbage")
    with pytest.raises(ConfigError, match="not a readable ONNX model"):
        read_onnx(garbage)
    with pytest.raises(ConfigError, match="does not exist"):
        read_onnx(tmp_path / "absent.onnx")


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ConfigError, match="exporter"):
        ExportOptions(exporter="magic")
    with pytest.raises(ConfigError, match="unknown parts"):
        ExportOptions(parts=("encoder", "classifier"))
    with pytest.raises(ConfigError, match="tolerance"):
        ExportOptions(tolerance=-1.0)


def test_an_autoencoder_checkpoint_exports_encoder_and_decoder(tmp_path: Path) -> None:
    model = make_tiny_model(seed=3)
    checkpoint = save_autoencoder(tmp_path / "ae", model.autoencoder, model.preprocess)
    exported = export_model(checkpoint, tmp_path / "out", ExportOptions(exporter="torchscript"))
    assert [g.part for g in exported] == ["encoder", "decoder"]  # parity frames from the rig
    assert not (tmp_path / "out" / "score_net.onnx").exists()


def test_the_default_dynamo_exporter_passes_parity(tiny: dict[str, Path], tmp_path: Path) -> None:
    (graph,) = export_model(
        tiny["checkpoint"],
        tmp_path,
        ExportOptions(parts=("encoder",), frames=tiny["data"], parity_sets=2),
    )
    assert graph.max_abs_error < 1e-4
    assert onnx_metadata(read_onnx(graph.path))["mvld.exporter"] == "dynamo"


@pytest.mark.slow
def test_cli_exports_everything_with_the_dynamo_exporter(
    tiny: dict[str, Path], tmp_path: Path
) -> None:
    code = export_main(["onnx", "--model", str(tiny["checkpoint"]), "--out", str(tmp_path), "-q"])
    assert code == EXIT_OK
    assert all((tmp_path / f"{part}.onnx.sha256").is_file() for part in GRAPHS)


def test_the_export_writes_the_model_descriptor_a_receiver_of_this_model_accepts(
    tiny: dict[str, Path],
) -> None:
    """docs/PROTOCOL.md 3.1: model.json beside the graphs, every value as the receiver checks it."""
    from mvld.common.wire import (
        FrameSetMessage,
        ViewRecord,
        decode_frameset,
        encode_frameset,
        quantize_latent,
    )
    from mvld.receiver.ingest import assemble, camera_layout

    descriptor = json.loads((tiny["out"] / "model.json").read_text())
    model = load_mvld_model(tiny["checkpoint"])
    layout = camera_layout(
        (),
        model.num_views,
        model.autoencoder.config.latent_dim,
        model.autoencoder.config.latent_shape,
    )
    assert descriptor["format"] == "mvld-model-descriptor"
    assert descriptor["encoder_fingerprint"] == model.fingerprint
    assert descriptor["wire_fingerprint"] == model.fingerprint[:16]
    assert descriptor["cameras"] == list(layout.camera_ids) == [f"cam{i}" for i in range(VIEWS)]
    assert descriptor["latent"]["shape"] == list(layout.latent_shape) == [LATENT]
    assert descriptor["image"]["height"] == descriptor["image"]["width"] == SIZE
    assert (
        descriptor["graphs"]["encoder"]["file_sha256"]
        == json.loads((tiny["out"] / "manifest.json").read_text())["graphs"]["encoder"][
            "file_sha256"
        ]
    )
    views = tuple(
        ViewRecord(
            cam,
            "ok",
            "none",
            1.0,
            quantize_latent(
                np.zeros(descriptor["latent"]["shape"], np.float32),
                descriptor["latent"]["default_dtype"],
            ),
        )
        for cam in descriptor["cameras"]
    )
    message = decode_frameset(
        encode_frameset(FrameSetMessage("n", 0, 1.0, descriptor["encoder_fingerprint"], views))
    )
    assert message.encoder_fingerprint == descriptor["wire_fingerprint"]
    assert assemble(message, layout, 1.0, None).present.all()


def test_cli_prints_the_wire_fingerprint_apart_from_the_file_hashes(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = export_main(
        [
            "onnx",
            "--model",
            str(tiny["checkpoint"]),
            "--out",
            str(tmp_path),
            "--exporter",
            "torchscript",
            "--parts",
            "encoder",
            "--frames",
            str(tiny["data"]),
            "-q",
        ]
    )
    assert code == EXIT_OK
    out = capsys.readouterr().out
    fingerprint = load_mvld_model(tiny["checkpoint"]).fingerprint
    assert f"encoder fingerprint (wire v1 enc, checked by the receiver) {fingerprint}" in out
    assert f"wire v2 enc (its first 8 bytes) {fingerprint[:16]}" in out
    assert "onnx_fingerprint" in out and "file_sha256" in out
    assert (tmp_path / "model.json").is_file()


def test_cli_without_a_model_exports_the_shipped_default_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``mvld-export onnx --out DIR`` exports the model every command uses by default."""
    from mvld.common.default_model import DEFAULT_MODEL

    code = export_main(
        ["onnx", "--out", str(tmp_path), "--exporter", "torchscript", "--parts", "encoder", "-q"]
    )
    assert code == EXIT_OK
    assert (tmp_path / "encoder.onnx").is_file() and not (tmp_path / "decoder.onnx").exists()
    shipped = load_mvld_model(DEFAULT_MODEL / "last").fingerprint
    assert f"(wire v1 enc, checked by the receiver) {shipped}" in capsys.readouterr().out
