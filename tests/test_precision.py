"""Mixed precision (--precision bf16): the forward passes compute in bf16, everything learned stays float32,
fp32 runs are the ones before the setting existed, and a run cannot change its precision on resume."""

import contextlib
import dataclasses
import importlib
import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import infodistill.methods.dm as dm_module
from conftest import initial_pixel_images
from infodistill.artefact import load_set, save_set
from infodistill.augment import DSA, DSAConfig
from infodistill.cli import build_parser, main
from infodistill.data import ClassSampler
from infodistill.errors import UserInputError
from infodistill.evaluate import evaluate_set, random_subset
from infodistill.files import CHECKPOINT_NAME
from infodistill.loop import DistillConfig, RegularizerTerm, build_method, distill, make_context, run_iteration
from infodistill.precision import autocast_context, cpu_has_native_bf16, resolve_precision
from infodistill.proxies import ProxyPool, train_proxy_pool
from infodistill.regularizers import CMIRegularizer
from infodistill.seeds import run_seeds
from infodistill.settings import given_flags
from infodistill.synthetic import PixelSet, build_synthetic
from infodistill.training import EvalConfig, bf16_measured, train_from_scratch, use_batched_training

# the modules of the loop that compute in a precision: one iteration, and the calibration of the CMI weight
loop_modules = [importlib.import_module(f"infodistill.loop.{name}") for name in ("step", "calibration")]

# DM matches with ConvNet-2-16 (width 16); the CMI proxies are ConvNet-1-8 (width 8): the hooks tell them apart.
TINY = dict(model="ConvNet-2-16", batch_real=16, ipc=2, iterations=2, monitor_every=0, cmi_weight="auto")


@pytest.fixture
def pool_dir(real, tmp_path):
    directory = tmp_path / "pool"
    train_proxy_pool(real, directory, arch="ConvNetGAP-1-8", count=2, epochs=1, progress=False)
    return directory


@contextlib.contextmanager
def conv_output_dtypes():
    """Record (output channels, output dtype) of every Conv2d forward pass while inside."""
    seen: list[tuple[int, torch.dtype]] = []

    def hook(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            seen.append((module.out_channels, output.dtype))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_bf16_distillation_is_close_to_fp32_and_writes_a_float32_artefact(real, pool_dir, tmp_path):
    # a tenth of the 'auto' strength: at full strength on this 1-epoch pool (lambda ~1e6) the term's steep
    # gradient amplifies bf16 rounding into a 14-39 % difference after two iterations
    config = DistillConfig(**TINY, proxies=str(pool_dir), cmi_auto_scale=0.1)
    runs = {precision: distill(dataclasses.replace(config, precision=precision), tmp_path / precision,
                               progress=False, real=real) for precision in ("fp32", "bf16")}
    sets = {precision: load_set(result.artefact) for precision, result in runs.items()}
    assert sets["bf16"].images.dtype == torch.float32 and sets["bf16"].metadata.extra["precision"] == "bf16"
    assert "precision" not in sets["fp32"].metadata.extra
    # bf16 keeps 8 significant bits (relative rounding up to 2^-8 ~ 0.4 %), and DM subtracts two nearly equal
    # class means (the set starts as real images), which amplifies that rounding in the gradient: measured, the
    # bf16 set differs from the fp32 one by 5.3 % of how far the fp32 set moved after two iterations. 15 % allows
    # for other CPUs' bf16 kernels. For scale, in fp32: an image learning rate 1.2x too
    # large moves the set 30 % away, dropping the CMI term 13 % (which terms run in bf16 is checked by the hook
    # test below); an exact match would mean bf16 was not used.
    moved = (sets["fp32"].images - initial_pixel_images(config, real)).norm()
    relative = float((sets["bf16"].images - sets["fp32"].images).norm() / moved)
    assert 1e-3 < relative < 0.15
    # the 'auto' CMI weight is calibrated in the run's precision: measured 0.05 % apart
    assert runs["bf16"].regularizer_weights["cmi"] == pytest.approx(runs["fp32"].regularizer_weights["cmi"], rel=0.02)


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_method_and_the_regularizer_forward_in_the_runs_precision_and_the_set_stays_float32(
        real, pool_dir, precision, expected):
    config = DistillConfig(**TINY).with_method_defaults()
    images, labels = real.train_tensors()
    sampler = ClassSampler(images, labels, real.info.num_classes)
    synthetic = PixelSet.initialise(sampler, 2, "real", torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(synthetic.parameters(), lr=1.0, momentum=0.5)
    terms = [RegularizerTerm("cmi", CMIRegularizer(ProxyPool.load(pool_dir, real.info)), 1000.0)]
    context = make_context(config, 0, synthetic, sampler, real, DSA(), torch.device("cpu"))
    with conv_output_dtypes() as seen:
        logged = run_iteration(build_method(config), terms, context, optimizer, precision=precision)
    assert {width for width, _ in seen} == {16, 8}  # DM's network and the proxy both ran
    assert {dtype for _, dtype in seen} == {expected}
    assert all(isinstance(value, float) for value in logged.values()) and logged["loss/cmi"] > 0
    assert synthetic.images().dtype == torch.float32
    assert all(state["momentum_buffer"].dtype == torch.float32 for state in optimizer.state.values())
    # outside the run autocast is off again
    assert not torch.is_autocast_enabled("cpu")


def test_fp32_is_the_computation_from_before_the_setting(real, pool_dir, tmp_path, monkeypatch):
    config = DistillConfig(**TINY, proxies=str(pool_dir), checkpoint_every=1)  # precision not given: 'auto',
    assert config.precision == "auto"  # which is fp32 on a CPU without native bf16 (conftest.py)
    default = distill(config, tmp_path / "default", progress=False, real=real)
    # the same run with every precision hook of the loop and of DM replaced by the plain code
    for loop_module in loop_modules:
        monkeypatch.setattr(loop_module, "computed_in", lambda precision, device, steps: steps)
        monkeypatch.setattr(loop_module, "autocast_context", lambda precision, device: contextlib.nullcontext())
        monkeypatch.setattr(loop_module, "to_fp32", lambda tensor: tensor)
    monkeypatch.setattr(dm_module, "to_fp32", lambda tensor: tensor)
    plain = distill(config, tmp_path / "plain", progress=False, real=real)
    # bit for bit: every tensor and every metadata string of the artefact and the checkpoint (the files'
    # bytes differ between any two writes: safetensors orders the metadata keys at random)
    for written in (lambda result: result.artefact, lambda result: result.out_dir / CHECKPOINT_NAME):
        ours, theirs = safetensors_content(written(default)), safetensors_content(written(plain))
        assert ours[1] == theirs[1] and ours[0].keys() == theirs[0].keys()
        assert all(torch.equal(tensor, theirs[0][name]) for name, tensor in ours[0].items())
    assert "precision" not in load_set(default.artefact).metadata.extra
    assert yaml.safe_load((tmp_path / "default" / "config.yaml").read_text())["precision"] == "fp32"


def safetensors_content(path) -> tuple[dict, dict]:
    """The tensors and the metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        return load_file(str(path)), handle.metadata()


def test_bf16_evaluation_scores_like_fp32_and_reports_its_precision(real):
    subset = random_subset(real, 5, seed=0)
    base = EvalConfig(model="ConvNet-2-16", runs=2, epochs=5)
    results = {}
    for precision in ("fp32", "bf16"):
        with conv_output_dtypes() as seen:
            results[precision] = evaluate_set(subset, real, dataclasses.replace(base, precision=precision),
                                              progress=False)
        assert {dtype for _, dtype in seen} == {torch.bfloat16 if precision == "bf16" else torch.float32}
    # measured on this data: fp32 81 / 92 %, bf16 81 / 93 % (the training is not saturated at 5 epochs)
    assert abs(results["bf16"].mean - results["fp32"].mean) <= 5.0
    assert results["bf16"].precision == "bf16" and results["bf16"].to_dict()["precision"] == "bf16"
    assert results["fp32"].to_dict()["precision"] == "fp32"
    assert "bf16" in results["bf16"].summary() and "fp32" not in results["fp32"].summary()


def test_bf16_training_keeps_float32_weights_and_trains_the_runs_one_after_another(real):
    subset = random_subset(real, 2, seed=0)
    config = EvalConfig(model="ConvNet-1-8", runs=2, epochs=1, batched="auto", precision="bf16")
    with conv_output_dtypes() as seen:
        models, together = train_from_scratch(subset.images, subset.labels, 10, config, run_seeds(0, 2),
                                              progress=False)
    # autocast does not reach the convolutions inside torch.func.vmap, so bf16 never trains the runs together
    assert not together and not use_batched_training(dataclasses.replace(config, device="cuda"), torch.device("cuda"))
    assert seen and {dtype for _, dtype in seen} == {torch.bfloat16}
    assert all(parameter.dtype == torch.float32 for model in models for parameter in model.parameters())
    with pytest.raises(UserInputError, match="batched 'on' cannot compute in bf16"):
        dataclasses.replace(config, batched="on").validate()


def test_resume_with_another_precision_is_refused(real, tmp_path):
    config = DistillConfig(**{**TINY, "cmi_weight": None}, checkpoint_every=1)
    out = tmp_path / "run"
    distill(config, out, progress=False, real=real)
    longer = dataclasses.replace(config, iterations=3)
    with pytest.raises(UserInputError, match="precision was 'fp32' in the run but is 'bf16' now"):
        distill(dataclasses.replace(longer, precision="bf16"), out, resume=True, progress=False, real=real)
    # a checkpoint written before the setting existed ran in fp32
    checkpoint = out / CHECKPOINT_NAME
    with safe_open(str(checkpoint), framework="pt") as handle:
        metadata = handle.metadata()
    stored = json.loads(metadata["config"])
    del stored["precision"]
    save_file(load_file(checkpoint), str(checkpoint), metadata={**metadata, "config": json.dumps(stored)})
    with pytest.raises(UserInputError, match="precision was 'fp32' in the run but is 'bf16' now"):
        distill(dataclasses.replace(longer, precision="bf16"), out, resume=True, progress=False, real=real)
    assert distill(longer, out, resume=True, progress=False, real=real).iterations == 3


def test_bad_precision_is_refused_in_yaml_and_flags(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("precision: fp16\n")
    assert main(["distill", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert main(["evaluate", str(tmp_path / "missing.safetensors"), "--config", str(bad)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("precision 'fp16' is not one of: auto, fp32, bf16" in line for line in errors)
    assert not (tmp_path / "run").exists()
    for command in (["distill"], ["evaluate", "set.safetensors"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--precision", "fp16"])
        assert exit_.value.code == 2 and "fp16" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="precision 'half' is not one of: auto, fp32, bf16"):
        DistillConfig(precision="half").validate()


def test_precision_flags_reach_the_configs(real, tmp_path, capsys):
    args = build_parser().parse_args(["distill", "--precision", "bf16"])
    assert given_flags(args, DistillConfig) == {"precision": "bf16"}
    path = save_set(random_subset(real, 1, seed=0), tmp_path / "set.safetensors")
    code = main(["evaluate", str(path), "--model", "ConvNet-1-8", "--runs", "1", "--epochs", "1",
                 "--precision", "bf16", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["precision"] == "bf16"


def test_autocast_context_is_plain_for_fp32_and_bf16_autocast_otherwise():
    layer = nn.Linear(4, 2)
    with autocast_context("fp32", "cpu"):
        assert layer(torch.ones(1, 4)).dtype == torch.float32
    with autocast_context("bf16", torch.device("cpu")):
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    for unresolved in ("fp16", "auto"):  # a programming error: the loop resolves 'auto' before computing
        with pytest.raises(ValueError, match=f"precision '{unresolved}' must be resolved"):
            autocast_context(unresolved, "cpu")


def test_a_network_trained_inside_one_bf16_region_uses_its_new_weights():
    """Gradient matching trains its network between two yields, inside one autocast region: a cached bf16
    copy of the weights would keep computing with the weights from before the step."""
    layer = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    inputs = torch.ones(2, 4)
    with autocast_context("bf16", "cpu"):
        before = layer(inputs)
        before.float().sum().backward()
        optimizer.step()
        assert not torch.equal(layer(inputs), before)


def test_data_handling_stays_float32_under_autocast(real):
    """Augmentation and decoding a parameterised set are not network compute: bf16 runs see the same pixels."""
    images, labels = real.train_tensors()
    sampler = ClassSampler(images, labels, real.info.num_classes)
    batch = images[:8].float()
    dsa = DSA(DSAConfig(mode="all"))  # every family, the affine ones through affine_grid (a matmul)
    params = dsa.sample(1, (28, 28), torch.Generator().manual_seed(0))
    lowrank = build_synthetic("lowrank", sampler, 1, "noise", torch.Generator().manual_seed(0), rank=2)
    plain = (dsa.apply(batch, params), lowrank.images(), lowrank.class_images(3))
    with autocast_context("bf16", "cpu"):
        mixed = (dsa.apply(batch, params), lowrank.images(), lowrank.class_images(3))
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(plain, mixed))


# ---- precision 'auto' -----------------------------------------------------------------------------------------


def test_native_bf16_is_read_from_the_cpu_flags():
    # cpu_has_native_bf16 is the real function (imported before conftest.py patches the module's name)
    assert cpu_has_native_bf16("flags : fpu sse avx512f avx512_bf16 avx512_vnni")
    assert cpu_has_native_bf16("flags : fpu amx_bf16 amx_tile")
    assert not cpu_has_native_bf16("flags : fpu sse avx2 avx512f")


@pytest.mark.parametrize("native, device, measured, expected", [
    (True, "cpu", True, "bf16"),
    (True, "cpu", False, "fp32"),   # not measured: fp32
    (True, "cuda", True, "fp32"),   # no GPU measured: fp32
    (False, "cpu", True, "fp32"),   # no native bf16: fp32
])
def test_auto_is_bf16_only_where_it_was_measured(monkeypatch, native, device, measured, expected):
    monkeypatch.setattr("infodistill.precision.cpu_has_native_bf16", lambda cpuinfo=None: native)
    assert resolve_precision("auto", device, measured) == expected
    assert resolve_precision("fp32", device, measured) == "fp32"  # explicit values pass through
    assert resolve_precision("bf16", device, measured) == "bf16"


def test_auto_distils_dm_in_bf16_and_other_methods_in_fp32_on_a_bf16_cpu(real, tmp_path, monkeypatch):
    monkeypatch.setattr("infodistill.precision.cpu_has_native_bf16", lambda cpuinfo=None: True)
    settings = dict(model="ConvNet-1-8", batch_real=8, ipc=2, iterations=2, monitor_every=0)
    auto = distill(DistillConfig(**settings), tmp_path / "auto", progress=False, real=real)
    explicit = distill(DistillConfig(**settings, precision="bf16"), tmp_path / "bf16", progress=False, real=real)
    assert auto.config.precision == "bf16"
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["precision"] == "bf16"
    ours, theirs = load_file(str(auto.artefact)), load_file(str(explicit.artefact))
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in ours.items())
    dsa = distill(DistillConfig(**settings, method="dsa", outer_loop=1), tmp_path / "dsa", progress=False, real=real)
    assert dsa.config.precision == "fp32"
    # resuming the auto run: the recorded bf16 is what 'auto' resolves to again, so the settings match
    distill(DistillConfig(**{**settings, "iterations": 3}), tmp_path / "auto", resume=True, progress=False, real=real)


def test_auto_evaluates_convnets_with_the_protocol_in_bf16_on_a_bf16_cpu(real, monkeypatch):
    monkeypatch.setattr("infodistill.precision.cpu_has_native_bf16", lambda cpuinfo=None: True)
    subset = random_subset(real, 1, seed=0)
    result = evaluate_set(subset, real, EvalConfig(model="ConvNet-1-8", runs=1, epochs=1), progress=False)
    assert result.precision == "bf16"
    assert bf16_measured(EvalConfig(model="ConvNet-3"))
    assert not bf16_measured(EvalConfig(model="AlexNet"))
    assert not bf16_measured(EvalConfig(model="ConvNet-3", recipe="kd"))
    assert not bf16_measured(EvalConfig(model="ConvNet-3", batched="on"))
