"""Config loading: merge semantics, overlays, interpolation, the `add` resolver, typo rejection, SLURM mapping."""

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import main
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.config import ConfigError, load_config, load_yaml, set_env_from_slurm
from utils.utils import get_obj_from_str, instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
SYNC_CFG = str(ROOT / "configs" / "sync.yaml")


@pytest.fixture
def small_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "action: train_avsync_model\n"
        "a: {b: 1, c: [1, 2]}\n"
        "width: 4\n"
        "derived: ${width}\n"
        "total: ${add:1,${width},3}\n"
        "training: {lr: 0.1}\n"
        "head: {target: torch.nn.Linear, params: {in_features: 2, out_features: 3}}\n"
    )
    return str(path)


def test_cli_wins_and_interpolations_resolve(small_yaml):
    cfg = load_config([f"config={small_yaml}", "a.b=5", "a.c=[3,4,5]", "width=7"])
    assert cfg.a.b == 5 and list(cfg.a.c) == [3, 4, 5]
    assert cfg.derived == 7  # interpolation sees the override
    assert cfg.total == 11  # ${add:1,7,3}
    assert cfg.training.lr == 0.1


def test_start_time_default_and_override(small_yaml):
    cfg = load_config([f"config={small_yaml}"])
    assert len(cfg.start_time) == len("24-01-04T16-39-21") and cfg.start_time[8] == "T"
    assert load_config([f"config={small_yaml}", "start_time=xyz"]).start_time == "xyz"


def test_typo_is_rejected_with_closest_key(small_yaml):
    with pytest.raises(ConfigError, match="trainig.lr.*Did you mean 'training.lr'"):
        load_config([f"config={small_yaml}", "trainig.lr=1"])
    with pytest.raises(ConfigError, match="training.lrr"):
        load_config([f"config={small_yaml}", "training.lrr=1"])


def test_runtime_and_optional_keys_are_allowed(small_yaml):
    cfg = load_config([f"config={small_yaml}", "ckpt_path=/x.pt", "data.iter_times=5", "config_off=/c.yaml"])
    assert cfg.ckpt_path == "/x.pt" and cfg.data.iter_times == 5


def test_new_param_accepted_only_if_target_takes_it(small_yaml):
    cfg = load_config([f"config={small_yaml}", "head.params.bias=false"])
    assert instantiate_from_config(cfg.head).bias is None
    with pytest.raises(ConfigError, match="head.params.biass"):
        load_config([f"config={small_yaml}", "head.params.biass=false"])


def test_published_config_loads_and_resolves():
    cfg = load_config([f"config={SYNC_CFG}", "training.base_batch_size=2"])
    assert cfg.model.params.aproj.params.out_features == 768
    assert cfg.model.params.transformer.params.off_head_cfg.params.out_features == 21
    assert cfg.training.base_batch_size == 2


def test_tiny_overlays_hold_only_differences_and_resolve_onto_their_base(tmp_path):
    for name, base in [("sync", "sync"), ("ft_synchability", "ft_synchability"), ("segment_avclip", "segment_avclip")]:
        tiny = load_config([f"config={ROOT / 'configs' / 'tiny' / f'{name}.yaml'}", "start_time=t"])
        full = load_config([f"config={ROOT / 'configs' / f'{base}.yaml'}", "start_time=t"])
        assert "defaults" not in tiny and tiny.action == full.action
        assert list(tiny.transform_sequence_train) != list(full.transform_sequence_train)  # n_mels follows the AST
        for seq in (tiny.transform_sequence_train, tiny.transform_sequence_test):
            (mel,) = [t for t in seq if t.target.endswith("AudioMelSpectrogram")]
            assert mel.params.n_mels == 32
        assert tiny.model.params.afeat_extractor.params.hidden_size == 32 and tiny.data.input_size == 32
        # the resolved config a run saves loads again on its own, unchanged
        OmegaConf.save(tiny, tmp_path / f"cfg-{name}.yaml")
        saved = load_config([f"config={tmp_path / f'cfg-{name}.yaml'}"])
        assert {**saved, "config": None} == {**tiny, "config": None}
    assert load_config([f"config={SYNC_CFG}"]).transform_sequence_test[6].params.n_mels == 128
    assert load_yaml(ROOT / "configs" / "tiny" / "ft_synchability.yaml").logging.vis_segment_sim is False


def test_overlay_keys_are_strict_and_defaults_relative(tmp_path, small_yaml):
    (tmp_path / "sub").mkdir()
    overlay = tmp_path / "sub" / "over.yaml"
    overlay.write_text("defaults: [../cfg.yaml]\na: {b: 2}\nhead: {params: {bias: false}}\ndata: {iter_times: 3}\n")
    cfg = load_config([f"config={overlay}", "width=5"])
    assert (cfg.a.b, list(cfg.a.c), cfg.total, cfg.data.iter_times) == (2, [1, 2], 9, 3)
    assert "defaults" not in cfg and cfg.head.params.bias is False
    bad_overlays = {
        "defaults: [../cfg.yaml]\ntraining: {lrr: 1}\n": "training.lrr.*cfg.yaml.*Did you mean 'training.lr'",
        "defaults: [over.yaml]\n": "lists itself",
        "defaults: ../cfg.yaml\n": "must be a list",
        "defaults: [../missing.yaml]\n": "not found.*missing.yaml",
    }
    for text, error in bad_overlays.items():
        overlay.write_text(text)
        with pytest.raises(ConfigError, match=error):
            load_config([f"config={overlay}"])


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config([f"config={tmp_path / 'missing.yaml'}"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="Malformed"):
        load_config([f"config={bad}"])
    with pytest.raises(ConfigError, match="config="):
        load_config(["a=1"])


def test_unknown_action_is_a_clear_error(small_yaml):
    with pytest.raises(ConfigError, match="Unknown action"):
        main.main([f"config={small_yaml}", "action=train_something"])


def test_slurm_env_mapping():
    env = {"SLURM_JOB_ID": "1", "SLURM_LOCALID": "2", "SLURM_PROCID": "6", "SLURM_NPROCS": "8"}
    set_env_from_slurm(env)
    assert (env["LOCAL_RANK"], env["RANK"], env["WORLD_SIZE"]) == ("2", "6", "8")
    torchrun_env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_JOB_ID": "1", "SLURM_PROCID": "5"}
    set_env_from_slurm(torchrun_env)
    assert torchrun_env["RANK"] == "0"  # torchrun's variables win
    plain = {}
    set_env_from_slurm(plain)
    assert plain == {}


def test_dotted_instantiation():
    linear = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 3, "out_features": 2}})
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (2, 3)
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)
    assert get_obj_from_str("torch.nn.Identity") is torch.nn.Identity
    with pytest.raises(KeyError, match="target"):
        instantiate_from_config({"params": {}})
    with pytest.raises(ImportError, match="NoSuchLayer"):
        get_obj_from_str("torch.nn.NoSuchLayer")


def test_setting_types_are_checked_when_the_config_is_read(tmp_path):
    """A wrong type or range fails in one line naming the setting, before any work (not after an epoch)."""
    tiny = str(ROOT / "configs" / "tiny" / "sync.yaml")
    for override, named in [("training.num_epochs=abc", "training.num_epochs='abc'"),
                            ("training.base_batch_size=-2", "training.base_batch_size=-2"),
                            ("training.skip_test=maybe", "training.skip_test='maybe'"),
                            ("data.iter_times=0", "data.iter_times=0"),
                            ("training.base_learning_rate=true", "training.base_learning_rate=True")]:  # fmt: skip
        with pytest.raises(ConfigError, match=f"^{re.escape(named)} .* must be"):
            load_config([f"config={tiny}", override])
    overlay = tmp_path / "three.yaml"
    overlay.write_text(f"defaults: [{tiny}]\ntraining: {{patience: three}}\n")
    with pytest.raises(ConfigError, match="training.patience='three' .*three.yaml.* must be an integer >= 0"):
        load_config([f"config={overlay}"])
    cfg = load_config([f"config={tiny}", "training.max_train_iters=null", "training.base_learning_rate=1"])
    assert cfg.training.max_train_iters is None and cfg.training.base_learning_rate == 1  # null: off; 1 is a number


def test_only_config_problems_become_config_errors():
    """A constructor's refusal of its arguments names the targets that lead to it; any other error (a bug) keeps
    its type and traceback."""
    transformer = {"target": "model.sync_model.GlobalTransformer", "params": {"n_layer": 1, "n_head": 5, "n_embd": 32}}
    with pytest.raises(ConfigError, match=r"^model.sync_model.GlobalTransformer: n_embd=32 .* n_head=5"):
        instantiate_from_config(transformer)
    with pytest.raises(ValueError, match="Invalid literal") as error:
        instantiate_from_config({"target": "fractions.Fraction", "params": {"numerator": "abc"}})
    assert not isinstance(error.value, ConfigError)


def test_a_test_only_run_refuses_a_checkpoint_that_does_not_fit_before_reading_data(tmp_path):
    tiny = str(ROOT / "configs" / "tiny" / "sync.yaml")
    state_dict = instantiate_from_config(load_config([f"config={tiny}"]).model).state_dict()
    ckpt = tmp_path / "other.pt"
    save_checkpoint({"model": dict(list(state_dict.items())[1:])}, ckpt)
    # the data is nowhere (`PLACEHOLDER`): reading it first would fail on that instead
    with pytest.raises(CheckpointError, match=f"{ckpt} do not fit .*: 1 missing"):
        main.main([f"config={tiny}", "training.run_test_only=True", f"ckpt_path={ckpt}", f"logging.logdir={tmp_path}"])
