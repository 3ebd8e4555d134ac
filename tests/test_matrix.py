"""bench/matrix.py: presets and setups load, cells expand with stable ids, bad matrices fail at the edge.

Every check here runs before anything trains: a matrix is YAML -> validated Matrix -> cells, and
each kind of mistake is one UserError line that names the file and the bad value.
"""

from __future__ import annotations

import pytest
import yaml

from bench.matrix import (CELL_OWNED, PRESETS_DIR, SETUPS_DIR, check_data, filter_cells, load_matrix,
                          load_setup, parse_matrix, preset_names, read_yaml, setup_names)
from ganlib.data import DataSpec
from ganlib.errors import UserError
from ganlib.metrics import MIN_SAMPLES
from ganlib.strategies import STRATEGIES

# A valid matrix every bad-input case below changes in one place.
TINY = {
    "name": "tiny",
    "network": {"name": "dcgan", "size": 28, "width": 8},
    "pairs": [{"source": "mnist5k:classes=0-4", "target": "mnist5k:classes=5-9:n=25"}],
    "strategies": ["scratch", "finetune", {"name": "freeze_d", "options": {"layers": 1}}],
    "setups": ["cpu-1proc", "cpu-2proc"],
    "seeds": [0, 1],
    "source_steps": 20,
    "transfer_steps": 10,
    "train": {"batch": 16},
    "metrics": {"num_samples": 100, "curve_samples": 50, "eval_every": 10, "target_fid": 50.0},
}


def _tiny(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(TINY))  # a deep copy
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_and_expands_to_its_product(name):
    matrix = load_matrix(name)
    raw = read_yaml(PRESETS_DIR.joinpath(f"{name}.yaml").read_text(), name)
    n_nets = len(raw["networks"]) if "networks" in raw else 1
    # each strategy entry runs with its own `augment` list, else the matrix's (default: none only)
    arms = sum(len(s.get("augment", raw.get("augment", ["none"]))) if isinstance(s, dict)
               else len(raw.get("augment", ["none"])) for s in raw["strategies"])
    expected = n_nets * len(raw["pairs"]) * arms * len(raw["setups"]) * len(raw["seeds"])
    cells = matrix.cells()
    assert len(cells) == expected
    assert len({c.id for c in cells}) == len(cells)
    assert matrix.name == raw["name"]


def test_presets_are_the_yaml_files_shipped():
    shipped = sorted(p.name[:-5] for p in PRESETS_DIR.iterdir() if p.name.endswith(".yaml"))
    assert preset_names() == shipped and "default" in shipped


@pytest.mark.parametrize("name", setup_names())
def test_every_setup_loads(name):
    setup = load_setup(name, "test")
    raw = yaml.safe_load(SETUPS_DIR.joinpath(f"{name}.yaml").read_text())
    assert setup.name == name
    assert setup.num_processes == raw.get("num_processes", 1) >= 1
    assert setup.mixed_precision == raw.get("mixed_precision", "no")
    assert setup.gpus_per_machine == (0 if raw.get("use_cpu") else max(1, setup.num_processes // setup.num_machines))


def test_cell_ids_follow_the_naming_scheme_setup_major():
    matrix = parse_matrix(_tiny(), "tiny.yaml")
    cells = matrix.cells()
    assert len(cells) == 3 * 2 * 2
    pair = "mnist5k-c0-4_2_mnist5k-c5-9-n25"
    expected = [f"{s}-{pair}-{setup}-s{seed}" for setup in ("cpu-1proc", "cpu-2proc")
                for s in ("scratch", "finetune", "freeze_d") for seed in (0, 1)]
    assert [c.id for c in cells] == expected
    # stable: parsing the same matrix again (as the worker does from matrix.yaml) gives the same ids
    assert [c.id for c in parse_matrix(_tiny(), "elsewhere.yaml").cells()] == expected


def test_strategy_id_names_repeated_strategies_apart():
    strategies = [{"name": "freeze_d", "options": {"layers": 1}, "id": "freeze_d1"},
                  {"name": "freeze_d", "options": {"layers": 2}, "id": "freeze_d2"}]
    matrix = parse_matrix(_tiny(strategies=strategies, setups=["cpu-1proc"], seeds=[0]), "m.yaml")
    assert [c.id.split("-")[0] for c in matrix.cells()] == ["freeze_d1", "freeze_d2"]
    assert [c.strategy.options for c in matrix.cells()] == [{"layers": 1}, {"layers": 2}]


def test_several_networks_put_the_network_in_the_id():
    nets = [{"name": "dcgan", "size": 28, "width": 8}, {"name": "dcgan", "size": 28, "width": 16}]
    matrix = parse_matrix(_tiny(network=None, networks=nets, strategies=["finetune"], setups=["cpu-1proc"],
                                seeds=[0]), "m.yaml")
    ids = [c.id for c in matrix.cells()]
    assert ids == ["finetune-dcgan28w8-mnist5k-c0-4_2_mnist5k-c5-9-n25-cpu-1proc-s0",
                   "finetune-dcgan28w16-mnist5k-c0-4_2_mnist5k-c5-9-n25-cpu-1proc-s0"]


def test_train_and_source_configs_of_a_cell():
    matrix = parse_matrix(_tiny(), "m.yaml")
    cell = next(c for c in matrix.cells() if c.strategy.name == "freeze_d" and c.seed == 1)
    cfg = matrix.train_config(cell)
    assert (cfg.net, cfg.size, cfg.width, cfg.batch, cfg.seed) == ("dcgan", 28, 8, 16, 1)
    assert cfg.data == "mnist5k:classes=5-9:n=25" and cfg.steps == 10 and cfg.eval_every == 10
    assert cfg.strategy == "freeze_d" and cfg.strategy_options == {"layers": 1}
    src = matrix.source_config(cell)
    assert src.data == "mnist5k:classes=0-4" and src.steps == 20 and src.strategy == "scratch"
    assert src.eval_every == 0 and src.strategy_options == {}
    # the FID reference is the whole target domain, not the few shots trained on
    assert str(cell.pair.eval_target) == str(DataSpec.parse("mnist5k:classes=5-9"))


def test_defaults_fill_in_network_setup_seed():
    data = _tiny(network=None, setups=None, seeds=None, metrics=None, train=None)
    matrix = parse_matrix(data, "m.yaml")
    assert [(n.name, n.size, n.width) for n in matrix.networks] == [("dcgan", 28, 64)]
    assert [s.name for s in matrix.setups] == ["cpu-1proc"] and matrix.seeds == [0]


def test_setup_may_be_a_yaml_file(tmp_path):
    path = tmp_path / "my-3proc.yaml"
    path.write_text("num_processes: 3\nuse_cpu: true\n")
    matrix = parse_matrix(_tiny(setups=[str(path)]), "m.yaml")
    assert matrix.setups[0].name == "my-3proc" and matrix.setups[0].num_processes == 3
    assert matrix.cells()[0].id.endswith("-my-3proc-s0")


# --- bad input: one line naming the file and the bad value, raised before anything runs --------

BAD = [
    ("unknown top-level field", dict(stratgies=["finetune"]), ["stratgies"]),
    ("missing pairs", dict(pairs=None), ["pairs"]),
    ("unknown strategy", dict(strategies=["finetune", "no_such_strategy"]), ["no_such_strategy"]),
    ("strategy option that does not exist", dict(strategies=[{"name": "freeze_d", "options": {"bogus": 1}}]),
     ["bogus", "freeze_d"]),
    ("strategy entry with a typo", dict(strategies=[{"name": "finetune", "opts": {}}]), ["opts"]),
    ("duplicate strategy", dict(strategies=["finetune", "finetune"]), ["duplicate cell id"]),
    ("duplicate seed", dict(seeds=[0, 0]), ["duplicate cell id"]),
    ("duplicate setup", dict(setups=["cpu-1proc", "cpu-1proc"]), ["duplicate cell id"]),
    ("unknown dataset", dict(pairs=[{"source": "mnist5k", "target": "no_such_data:n=5"}]), ["no_such_data"]),
    ("pair without target", dict(pairs=[{"source": "mnist5k"}]), ["source", "target"]),
    ("unknown network", dict(network={"name": "no_such_net", "size": 28}), ["no_such_net"]),
    ("unknown setup", dict(setups=["cpu-9proc"]), ["cpu-9proc"]),
    ("setup file missing", dict(setups=["nowhere/x.yaml"]), ["nowhere/x.yaml"]),
    ("unknown extractor", dict(metrics={"extractor": "no_such_extractor"}), ["no_such_extractor"]),
    ("unknown metrics field", dict(metrics={"num_sample": 100}), ["num_sample"]),
    ("too few samples", dict(metrics={"num_samples": MIN_SAMPLES - 1}), ["num_samples", str(MIN_SAMPLES - 1)]),
    ("too few curve samples", dict(metrics={"curve_samples": 3}), ["curve_samples"]),
    ("negative eval_every", dict(metrics={"eval_every": -3}), ["eval_every", "-3"]),
    ("target FID not a number", dict(metrics={"target_fid": "low"}), ["target_fid", "low"]),
    ("train field the matrix owns", dict(train={"steps": 5}), ["train.steps"]),
    ("unknown train field", dict(train={"bacth": 16}), ["bacth"]),
    ("train value of the wrong type", dict(train={"lr_g": "2e-4"}), ["lr_g", "2e-4"]),
    ("train value out of range", dict(train={"batch": 1}), ["batch=1"]),
    ("steps not an integer", dict(transfer_steps="10"), ["transfer_steps"]),
    ("zero source steps", dict(source_steps=0), ["source_steps"]),
    ("negative seed", dict(seeds=[-1]), ["seed"]),
    ("train not a mapping", dict(train=["batch: 16"]), ["train", "mapping"]),
    ("metrics not a mapping", dict(metrics=[100]), ["metrics", "mapping"]),
    ("unknown augment", dict(augment=["none", "mixup"]), ["mixup"]),
    ("augment option that does not exist", dict(augment=[{"name": "ada", "options": {"speed": 2}}]),
     ["speed", "ada"]),
    ("augment set in train", dict(train={"augment": "ada"}), ["train.augment"]),
    ("empty augment list", dict(augment=[]), ["augment"]),
    ("strategy augment entry with a typo", dict(strategies=[{"name": "finetune", "augment": [{"nam": "ada"}]}]),
     ["nam"]),
    ("strategy options a list", dict(strategies=[{"name": "freeze_d", "options": [1]}]), ["options", "mapping", "[1]"]),
]


@pytest.mark.parametrize("label, changes, words", BAD, ids=[b[0] for b in BAD])
def test_bad_matrix_is_one_user_error_line(label, changes, words):
    with pytest.raises(UserError) as err:
        parse_matrix(_tiny(**changes), "bad.yaml")
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith("bad.yaml"), text  # names the file
    for word in words:
        assert word in text, text


def test_every_field_the_matrix_owns_is_refused_in_train():
    for name in sorted(CELL_OWNED):
        with pytest.raises(UserError, match=f"train.{name}"):
            parse_matrix(_tiny(train={name: 1}), "bad.yaml")


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\npairs:\n  - {source: mnist5k, target: digits\nseeds: [0]\n")
    with pytest.raises(UserError) as err:
        load_matrix(str(path))
    assert str(err.value).startswith(f"{path} line ") and "malformed YAML" in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- finetune\n- scratch\n")
    with pytest.raises(UserError, match="mapping"):
        load_matrix(str(path))


@pytest.mark.parametrize("ref, word", [("no_such_preset", "unknown preset"), ("missing.yaml", "does not exist")])
def test_unknown_preset_or_missing_file(ref, word):
    with pytest.raises(UserError, match=word) as err:
        load_matrix(ref)
    for name in preset_names():
        assert name in str(err.value)  # says what exists


@pytest.mark.parametrize("setup, word", [
    ("mixed_precision: fp8\n", "mixed_precision"),
    ("use_cpu: true\nmixed_precision: fp16\n", "fp16"),
    ("num_processes: 0\n", "num_processes"),
    ("num_processes: two\n", "num_processes='two' must be an integer >= 1"),
    ("num_machines: 1.5\n", "num_machines=1.5"),
])
def test_bad_setup_file(tmp_path, setup, word):
    path = tmp_path / "s.yaml"
    path.write_text(setup)
    with pytest.raises(UserError, match=word):
        parse_matrix(_tiny(setups=[str(path)]), "bad.yaml")


@pytest.mark.parametrize("target, word", [
    ("mnist5k:classes=5-12:n=25", "classes"),
    ("mnist5k:classes=5-9:n=99999", "n=99999"),
])
def test_check_data_refuses_data_the_dataset_lacks(target, word):
    matrix = parse_matrix(_tiny(pairs=[{"source": "mnist5k:classes=0-4", "target": target}]), "m.yaml")
    with pytest.raises(UserError, match=word):
        check_data(matrix)


@pytest.mark.parametrize("content", [
    "name: x\n".encode("utf-16"),                        # UTF-16 with its byte-order mark
    bytes(range(256)) * 4,                                # binary
])
def test_matrix_file_that_is_not_utf8_text_is_one_line(tmp_path, content):
    path = tmp_path / "m.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match="is not UTF-8 text") as err:
        load_matrix(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_check_data_refuses_a_folder_target_too_small_to_score(tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "one").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "one" / "only.png")
    matrix = parse_matrix(_tiny(pairs=[{"source": "mnist5k:classes=0-4", "target": f"folder:{tmp_path / 'one'}"}]),
                          "m.yaml")
    with pytest.raises(UserError, match=f"holds 1 image\\(s\\); .* needs at least {MIN_SAMPLES}"):
        check_data(matrix)


def test_check_data_accepts_data_the_dataset_has():
    check_data(parse_matrix(_tiny(), "m.yaml"))
    # the edge: every one of the 2,500 digits 5-9 (one more is refused, above and below)
    edge = _tiny(pairs=[{"source": "mnist5k:classes=0-4", "target": "mnist5k:classes=5-9:n=2500"}])
    check_data(parse_matrix(edge, "m.yaml"))
    edge["pairs"][0]["target"] = "mnist5k:classes=5-9:n=2501"
    with pytest.raises(UserError, match="n=2501"):
        check_data(parse_matrix(edge, "m.yaml"))


# --- --only -----------------------------------------------------------------------------------

@pytest.mark.parametrize("only, expected", [
    ("strategy=finetune", lambda c: c.strategy.id == "finetune"),
    ("strategy=finetune,strategy=scratch", lambda c: c.strategy.id in ("finetune", "scratch")),
    ("strategy=f*,setup=cpu-2proc", lambda c: c.strategy.id.startswith("f") and c.setup == "cpu-2proc"),
    ("seed=1", lambda c: c.seed == 1),
    ("cell=scratch-*-cpu-1proc-s0", lambda c: c.id.startswith("scratch-") and c.id.endswith("cpu-1proc-s0")),
    ("pair=mnist5k-c0-4_2_*", lambda c: True),
    (None, lambda c: True),
])
def test_only_keeps_matching_cells(only, expected):
    cells = parse_matrix(_tiny(), "m.yaml").cells()
    kept = filter_cells(cells, only)
    assert kept == [c for c in cells if expected(c)] and kept


@pytest.mark.parametrize("only, word", [("strategy=nothing", "matches no cell"), ("colour=red", "key=pattern"),
                                        ("finetune", "key=pattern")])
def test_only_errors(only, word):
    with pytest.raises(UserError, match=word):
        filter_cells(parse_matrix(_tiny(), "m.yaml").cells(), only)


def test_every_registered_strategy_can_be_a_matrix_cell():
    """A strategy added to the registry is accepted by the matrix the day it is added."""
    matrix = parse_matrix(_tiny(strategies=STRATEGIES.names(), setups=["cpu-1proc"], seeds=[0]), "m.yaml")
    assert [c.strategy.name for c in matrix.cells()] == STRATEGIES.names()
    assert len({c.id for c in matrix.cells()}) == len(STRATEGIES.names())


def test_augment_is_an_axis_for_all_strategies_or_per_strategy_entry():
    strategies = ["scratch", {"name": "finetune", "augment": ["none", {"name": "ada", "options": {"target": 0.7}}]}]
    matrix = parse_matrix(_tiny(strategies=strategies, augment=["diffaugment"], setups=["cpu-1proc"], seeds=[0]),
                          "m.yaml")
    cells = matrix.cells()
    pair = "mnist5k-c0-4_2_mnist5k-c5-9-n25"
    # ids of cells without augmentation are unchanged; the others name it after the strategy
    assert [c.id for c in cells] == [f"scratch+diffaugment-{pair}-cpu-1proc-s0", f"finetune-{pair}-cpu-1proc-s0",
                                     f"finetune+ada-{pair}-cpu-1proc-s0"]
    cfg = matrix.train_config(cells[2])
    assert cfg.augment == "ada" and cfg.augment_options == {"target": 0.7}
    assert matrix.train_config(cells[1]).augment == "none"
    assert matrix.source_config(cells[0]).augment == "none"  # sources never augment: one per pair
    assert [c.id for c in filter_cells(cells, "augment=ada")] == [cells[2].id]
    from bench.cell import identity
    record = identity(matrix, cells[2], "r")
    assert record["strategy"] == "finetune+ada" and record["augment"] == "ada"
    assert record["augment_options"] == {"target": 0.7}


def test_validating_a_matrix_does_not_import_the_training_loop():
    # Checking a matrix needs the data specs, registries and networks, never ganlib.train (which pulls
    # in the loop's dependencies): facts about data belong to the data spec.
    import subprocess
    import sys

    code = "import sys, bench.matrix; print('ganlib.train' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- pairs from a checkpoint, eval folders, files that are missing, published FIDs -------------------

def _stylegan_pairs(**pair) -> dict:
    """A stylegan2 matrix with one checkpoint pair (`pair` overrides its keys; None drops one)."""
    entry = {"id": "babies", "source_checkpoint": "$GB_CKPT", "target": "folder:$GB_DATA/babies/train:n=10",
             "eval": "folder:$GB_DATA/babies/test", "fetch": "gdown 1abc -O babies.zip"}
    for key, value in pair.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return _tiny(network={"name": "stylegan2", "size": 32, "width": 2}, pairs=[entry], source_steps=None,
                 train={"batch": 4, "latent_dim": 16})


def test_a_checkpoint_pair_has_no_source_data_and_keeps_its_paths_as_written():
    matrix = parse_matrix(_stylegan_pairs(), "m.yaml")
    pair = matrix.pairs[0]
    assert pair.id == "babies" and pair.source is None and pair.channels == 3
    assert pair.source_text == "checkpoint:$GB_CKPT"
    assert str(pair.eval_target) == "folder:$GB_DATA/babies/test" and not pair.shots_in_eval
    assert matrix.source_steps == 0
    cell = next(c for c in matrix.cells() if c.strategy.id == "finetune")
    assert cell.id.startswith("finetune-babies-")
    assert matrix.train_config(cell).source_checkpoint == "$GB_CKPT" and matrix.source_config(cell) is None
    unnamed = parse_matrix(_stylegan_pairs(id=None), "m.yaml").pairs[0]
    assert unnamed.id.startswith("ckpt_gb_ckpt_2_folder_train_")


@pytest.mark.parametrize("change, word", [
    ({"source": "mnist5k"}, "exactly one of source"),                         # both sources
    ({"source_checkpoint": None}, "exactly one of source"),                   # neither
    ({"target": "folder:$GB_DATA/babies/train"}, "give their number"),       # an eval set, shots without n
    ({"id": "a b"}, "pair id 'a b'"),
    ({"fetch": ""}, "pair fetch must be non-empty"),
])
def test_bad_pairs_are_one_line(change, word):
    with pytest.raises(UserError, match=word) as err:
        parse_matrix(_stylegan_pairs(**change), "m.yaml")
    assert "\n" not in str(err.value)


def test_a_checkpoint_pair_needs_the_stylegan2_family():
    data = _stylegan_pairs()
    data["network"] = {"name": "dcgan", "size": 32, "width": 8}
    with pytest.raises(UserError, match="needs network stylegan2, not dcgan"):
        parse_matrix(data, "m.yaml")


def test_missing_files_skip_the_cells_that_need_them_and_say_how_to_get_them(tmp_path, monkeypatch):
    from bench.matrix import missing_files

    monkeypatch.delenv("GB_CKPT", raising=False)
    monkeypatch.setenv("GB_DATA", str(tmp_path))
    matrix = parse_matrix(_stylegan_pairs(), "m.yaml")
    cells = matrix.cells()
    missing = missing_files(matrix, cells)
    assert set(missing) == {c.id for c in cells}   # the target folders are not there either
    scratch = next(c for c in cells if c.strategy.id == "scratch")
    finetune = next(c for c in cells if c.strategy.id == "finetune")
    assert missing[scratch.id].startswith(f"target folder {tmp_path}/babies/train does not exist")
    assert missing[scratch.id].endswith("; to get the files: gdown 1abc -O babies.zip")
    for part in ("train", "test"):
        (tmp_path / "babies" / part).mkdir(parents=True)
    missing = missing_files(matrix, cells)
    assert scratch.id not in missing                # scratch loads no source: the checkpoint is not needed
    assert missing[finetune.id].startswith("source checkpoint $GB_CKPT names $GB_CKPT, which is not set")
    monkeypatch.setenv("GB_CKPT", str(tmp_path / "ffhq.pt"))
    assert missing_files(matrix, cells)[finetune.id].startswith(f"source checkpoint {tmp_path}/ffhq.pt does not exist")
    (tmp_path / "ffhq.pt").write_bytes(b"")
    assert missing_files(matrix, cells) == {}


def test_missing_inception_weights_skip_every_cell(tmp_path, monkeypatch):
    from bench.matrix import missing_files

    monkeypatch.setenv("GANBENCH_INCEPTION_WEIGHTS", str(tmp_path / "nope.pth"))
    matrix = parse_matrix(_tiny(metrics={"extractor": "inception-v3-compat", "num_samples": 100,
                                         "curve_samples": 50}), "m.yaml")
    missing = missing_files(matrix, matrix.cells())
    assert len(missing) == len(matrix.cells())
    assert all(f"Inception weights file {tmp_path}/nope.pth does not exist" in r for r in missing.values())


def test_missing_torchvision_data_is_a_skip_with_the_download_command(tmp_path, monkeypatch):
    from bench.matrix import missing_files

    monkeypatch.setenv("GANBENCH_DATA", str(tmp_path))
    matrix = parse_matrix(_tiny(pairs=[{"source": "mnist5k:classes=0-4", "target": "fashion-mnist:n=25"}]), "m.yaml")
    missing = missing_files(matrix, matrix.cells())
    assert len(missing) == len(matrix.cells())
    assert all("--data fashion-mnist --download" in r for r in missing.values())
    check_data(matrix, missing)   # nothing left to check: no error


@pytest.mark.parametrize("published, word", [
    ([{"citation": "X", "fid": {"nope": {"finetune": 1.0}}}], "names pair 'nope'"),
    ([{"citation": "X", "fid": {"babies": {"tgan": 1.0}}}], "names arm 'tgan'"),
    ([{"citation": "X", "fid": {"babies": {"finetune+adda": 1.0}}}], "names arm 'finetune\\+adda'"),
    ([{"citation": "X", "fid": {"babies": {"finetune": "high"}}}], "must map arms to FIDs"),
    ([{"fid": {"babies": {"finetune": 1.0}}}], "needs a citation"),
])
def test_published_fids_name_pairs_and_arms_of_the_matrix(published, word):
    data = _stylegan_pairs()
    data["published"] = published
    with pytest.raises(UserError, match=word):
        parse_matrix(data, "m.yaml")
    data["published"] = [{"citation": "X", "url": "https://x", "fid": {"babies": {"finetune": 104.79, "cdc+ada": 1.0}}}]
    assert parse_matrix(data, "m.yaml").published[0].fid == {"babies": {"finetune": 104.79, "cdc+ada": 1.0}}


def test_the_fewshot_preset_follows_the_protocol():
    matrix = load_matrix("fewshot-ffhq")
    assert {p.id for p in matrix.pairs} == {"babies", "sunglasses", "sketches"}
    assert all(p.source_checkpoint == "$GANBENCH_STYLEGAN2_FFHQ" and p.target.n == 10 and p.eval is not None
               and p.fetch for p in matrix.pairs)
    assert matrix.metrics.extractor == "inception-v3-compat" and matrix.metrics.num_samples == 5000
    assert not matrix.metrics.cap_at_real and matrix.metrics.intra_lpips
    assert {s.name for s in matrix.setups} == {"1xgpu-fp32", "1xgpu-bf16", "8xgpu-fp32", "8xgpu-bf16"}
    assert (matrix.networks[0].size, matrix.networks[0].width, matrix.train["latent_dim"]) == (256, 64, 512)
    assert matrix.published and all(src.url.startswith("https://") for src in matrix.published)


def test_a_present_checkpoint_that_does_not_fit_is_refused_before_anything_runs(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from bench.matrix import missing_files
    from test_rosinality import small_checkpoint

    for part in ("train", "test"):
        (tmp_path / "babies" / part).mkdir(parents=True)
        for i in range(MIN_SAMPLES):
            Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(tmp_path / "babies" / part / f"{i}.png")
    monkeypatch.setenv("GB_DATA", str(tmp_path))
    monkeypatch.setenv("GB_CKPT", str(tmp_path / "c.pt"))
    matrix = parse_matrix(_stylegan_pairs(), "m.yaml")
    small_checkpoint(tmp_path / "c.pt", size=32, width=2, latent=16, channels=3)
    check_data(matrix, missing_files(matrix, matrix.cells()))           # it fits: nothing to say
    small_checkpoint(tmp_path / "c.pt", size=32, width=4, latent=16, channels=3)
    with pytest.raises(UserError, match="width 4; this run builds .* width=2"):
        check_data(matrix, missing_files(matrix, matrix.cells()))
    (tmp_path / "c.pt").write_bytes((tmp_path / "c.pt").read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or not a torch checkpoint"):
        check_data(matrix, missing_files(matrix, matrix.cells()))


def test_compile_in_train_is_refused_not_silently_ignored():
    # the worker's accelerator compiles per setup (dynamo_config); a train: value never reached it
    with pytest.raises(UserError, match="train.compile is the hardware setup's under bench .*1xgpu-bf16-compile"):
        parse_matrix(_tiny(train={"batch": 16, "compile": True}), "m.yaml")
