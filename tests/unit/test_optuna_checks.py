"""Optuna searches (hparams_search=): what Optuna or a trial would refuse, refused before the first trial.

Each was a traceback, Hydra's error with exit 1, or every trial refused one by one, after the
search had started (and made its sweep directory)."""

from __future__ import annotations

import pytest

from sala_train.config.compose import check_command_line
from sala_train.config.schema import RunConfig
from sala_train.config.typed import ConfigError

LORA = ("hparams_search=lora_optuna", "hydra.sweeper.n_trials=2")
FULL = ("hparams_search=full_optuna", "hydra.sweeper.n_trials=2")


def problems_of(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        check_command_line(list(overrides), "train", RunConfig)
    return err.value.problems


def passes(*overrides: str) -> None:
    check_command_line(list(overrides), "train", RunConfig)


@pytest.fixture
def my_search(tmp_path):
    """A user's own search preset (``--config-dir``): lora_optuna with its own ranges."""
    from sala_train.config.entries import use_user_config_dirs

    (tmp_path / "hparams_search").mkdir()

    def preset(params: str) -> tuple[str, ...]:
        (tmp_path / "hparams_search" / "my_search.yaml").write_text(
            f"# @package _global_\ndefaults:\n  - lora_optuna\n  - _self_\n\nhydra:\n  sweeper:\n    params:\n{params}"
        )
        return ("-cd", str(tmp_path), "hparams_search=my_search", "hydra.sweeper.n_trials=2")

    yield preset
    use_user_config_dirs([])  # the next command line sets its own


def test_an_interval_written_high_to_low_is_refused():
    """Optuna: ``ValueError: The low value must be smaller than or equal to the high value``."""
    assert problems_of(*LORA, "method.dropout=interval(0.5,0.1)") == [
        "method.dropout=interval(0.5,0.1): the interval's low end 0.5 is above its high end 0.1; "
        "write the lower one first"
    ]
    assert problems_of(*LORA, "train.learning_rate=tag(log,interval(1e-3,1e-5))") == [
        "train.learning_rate=tag(log,interval(1e-3,1e-5)): the interval's low end 0.001 is above its high end "
        "1e-05; write the lower one first"
    ]
    assert problems_of(*LORA, "method.r=int(interval(32,4))") == [
        "method.r=int(interval(32,4)): the interval's low end 32 is above its high end 4; write the lower one first"
    ]
    passes(*LORA, "method.dropout=interval(0.1,0.5)")
    passes(*LORA, "method.dropout=interval(0.1,0.1)")  # Optuna takes equal ends


def test_a_log_interval_from_zero_is_refused():
    """Optuna: ``The low value must be larger than 0 for a log distribution`` (1 for integers)."""
    assert problems_of(*LORA, "method.dropout=tag(log,interval(0,0.2))") == [
        "method.dropout=tag(log,interval(0,0.2)): a log-scale interval's low end must be above 0; got 0.0"
    ]
    assert problems_of(*LORA, "train.warmup_steps=tag(log,int(interval(0,64)))") == [
        "train.warmup_steps=tag(log,int(interval(0,64))): a log-scale interval's low end must be at least 1 "
        "(an integer range); got 0"
    ]
    passes(*LORA, "train.warmup_steps=tag(log,int(interval(1,64)))")
    # A low end the key refuses anyway: the key's own line says so, once.
    assert problems_of(*LORA, "method.alpha=tag(log,int(interval(0,64)))") == [
        "in the job with method.alpha=tag(log,int(interval(0,64))) at 0: method.alpha: must be >= 1, got 0"
    ]


def test_a_presets_own_range_is_checked_like_the_command_lines(my_search):
    assert problems_of(*my_search("      method.dropout: interval(0.3, 0.1)\n")) == [
        "hparams_search=my_search searches method.dropout=interval(0.3, 0.1): the interval's low end 0.3 is "
        "above its high end 0.1; write the lower one first"
    ]
    # Some values refused: each is named, with the preset's range it comes from.
    assert problems_of(*my_search("      method.r: choice(0, 8, 16)\n      method.dropout: interval(0.0, 1.5)\n")) == [
        "hparams_search=my_search searches method.r=choice(0, 8, 16); at 0: method.r: must be >= 1, got 0",
        "hparams_search=my_search searches method.dropout=interval(0.0, 1.5); at 1.5: method.dropout: must be "
        "in [0, 1), got 1.5",
    ]
    passes(*my_search("      method.dropout: interval(0.0, 0.3)\n"))
    # A command-line value or range replaces the preset's: the preset's bad one is not searched.
    passes(*my_search("      method.r: choice(0, 8, 16)\n"), "method.r=8")
    passes(*my_search("      method.r: choice(0, 8, 16)\n"), "method.r=choice(8,16)")


def test_the_search_direction_is_minimize_or_maximize():
    """Optuna: ``ValueError: Please set either 'minimize' or 'maximize' to direction`` (a traceback);
    a list of two made every trial fail (a job returns one value)."""
    assert problems_of(*LORA, "hydra.sweeper.direction=maximise") == [
        "hydra.sweeper.direction=maximise: the search's direction is minimize or maximize (each trial returns "
        "its best validation loss: minimize looks for the lowest); got maximise"
    ]
    assert problems_of(*FULL, "hydra.sweeper.direction=MINIMIZE")[0].endswith("got MINIMIZE")
    assert problems_of(*LORA, "hydra.sweeper.direction=null")[0].endswith("got null")
    assert problems_of(*LORA, "hydra.sweeper.direction=[minimize,maximize]") == [
        "hydra.sweeper.direction=[minimize,maximize]: each trial returns one value (its best validation loss), "
        "so the search takes one direction, minimize or maximize; got 2"
    ]
    for direction in ("minimize", "maximize", "[minimize]"):
        passes(*LORA, f"hydra.sweeper.direction={direction}")
    passes("-m", "hydra/sweeper=optuna", "train.learning_rate=interval(1e-5,1e-3)")  # its default: Direction.minimize


def test_a_search_for_another_method_is_one_line_naming_its_keys():
    """Hydra: ``Could not override 'method.r' ... Key 'r' is not in struct``, exit 1, on the first
    trial, with a sweep directory holding only ``.sweep_started``."""
    expected = (
        "hparams_search=lora_optuna searches method.r, method.alpha, method.dropout (keys of method=lora), "
        "which method=full does not have; for method=full use hparams_search=full_optuna"
    )
    assert problems_of(*LORA, "method=full") == [expected]
    assert problems_of("method=full", *LORA) == [expected]  # (in any order)
    # full_optuna searches train.* keys, which LoRA has too.
    passes(*FULL, "method=lora")


def test_a_presets_range_the_command_line_rules_out_is_one_line_before_any_trial():
    """full_optuna searches train.warmup_ratio; with train.warmup_steps=5 a config rule refused
    every trial, one by one, and the search ended with no best parameters."""
    assert problems_of(*FULL, "train.warmup_steps=5") == [
        "hparams_search=full_optuna searches train.warmup_ratio=choice(0.0, 0.01, 0.03, 0.1), and every value "
        "it can take is refused with this command line (at 0.0: train.warmup_ratio=0.0 / train.warmup_steps=5: "
        "both set the warm-up; give one (train.warmup_steps=0 to use the ratio)); giving train.warmup_ratio on "
        "the command line replaces the preset's range"
    ]
    # Taking the key out of the search (a value for it) or the steps away both pass.
    passes(*FULL, "train.warmup_steps=5", "train.warmup_ratio=null")
    passes(*FULL, "train.warmup_ratio=choice(0.01,0.1)")
    # A problem of the command line alone stays its own line, not blamed on the preset's ranges.
    assert problems_of(*FULL, "train.max_grad_norm=-1") == [
        "train.max_grad_norm: must be >= 0 (0: no clipping), got -1.0"
    ]


def test_a_study_kept_in_a_database_can_be_continued(tmp_path):
    """hydra.sweeper.storage=sqlite:///...: Optuna 2.10, which the sweeper holds sala-train to,
    failed on SQLAlchemy 2 ("assert version is not None"); pyproject keeps it on 1.4."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    again = optuna.load_study(storage=storage, study_name="s")
    again.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert len(optuna.load_study(storage=storage, study_name="s").trials) == 3


def test_a_search_of_no_trials_or_with_nowhere_to_store_them_is_refused(tmp_path):
    """n_trials=0 ran no trial and failed with "no trial completed"; a SQLite database in a missing
    directory was a sqlalchemy traceback at the first trial; both after the sweep directory existed."""
    assert problems_of("hparams_search=lora_optuna", "hydra.sweeper.n_trials=0", "hydra.sweeper.n_jobs=-1") == [
        "hydra.sweeper.n_trials: must be a whole number >= 1, got 0",
        "hydra.sweeper.n_jobs: must be a whole number >= 1, got -1",
    ]
    missing = tmp_path / "nowhere" / "study.db"
    assert problems_of(*LORA, f"hydra.sweeper.storage=sqlite:///{missing}") == [
        f"hydra.sweeper.storage=sqlite:///{missing}: no directory {missing.parent} for its database"
    ]
    passes(*LORA, f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}")
    # A sampler seed numpy refuses: Hydra's "Error in call to target" traceback, after the sweep began.
    for seed in ("-1", "4294967296"):
        assert problems_of(*LORA, f"hydra.sweeper.sampler.seed={seed}") == [
            f"hydra.sweeper.sampler.seed: must be a whole number from 0 to 2**32 - 1, got {seed}"
        ]
    passes(*LORA, "hydra.sweeper.sampler.seed=4294967295")
    # Interpolations are Hydra's to resolve when the search starts (a review found them refused).
    passes("hparams_search=lora_optuna", "hydra.sweeper.n_trials=${oc.env:SALA_TRIALS,2}",
           "hydra.sweeper.storage=sqlite:///${hydra:runtime.cwd}/study.db")  # fmt: skip


def test_a_range_in_a_search_means_what_it_means_in_a_sweep():
    """Hydra's Optuna sweeper made range(a,b) a distribution up to b, which Optuna draws too: the
    presets' sweeper reads it as -m does (b left out), which is what the command line was checked
    with; Hydra's own sweeper, chosen directly, still draws b, so its check includes b."""
    from hydra_plugins.hydra_optuna_sweeper import _impl
    from optuna.distributions import CategoricalDistribution

    from hydra_plugins.sala_train_optuna.sweeper import _ranges_read_as_in_a_sweep

    lines = ["train.seed=range(1,3)", "method.dropout=range(0.5,1.0,0.5)", "train.max_steps=shuffle(range(1,3))"]
    drawn, _ = _impl.create_params_from_overrides(lines)
    assert (drawn["train.seed"].low, drawn["train.seed"].high, drawn["method.dropout"].high) == (1, 3, 1.0)
    with _ranges_read_as_in_a_sweep():
        drawn, _ = _impl.create_params_from_overrides(lines)
    assert (drawn["train.seed"].low, drawn["train.seed"].high, drawn["train.seed"].step) == (1, 2, 1)
    assert (drawn["method.dropout"].low, drawn["method.dropout"].high) == (0.5, 0.5)
    assert isinstance(drawn["train.max_steps"], CategoricalDistribution)  # (a shuffled range: its values)
    assert _impl.create_optuna_distribution_from_override.__name__ == "create_optuna_distribution_from_override"

    passes(*LORA, "method.dropout=range(0.5,1.0,0.5)")
    assert problems_of("-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "method=lora",
                       "method.dropout=range(0.5,1.0,0.5)") == [
        "in the job with method.dropout=1.0: method.dropout: must be in [0, 1), got 1.0"
    ]  # fmt: skip


def test_a_sweep_or_search_an_experiment_sets_is_checked_before_it_starts(tmp_path):
    """Hydra 1.2's way to keep a sweep in a config file (hydra.mode: MULTIRUN, hydra.sweeper.params)
    went unchecked: bad values were found job by job after the first ones trained, a misspelt key
    was Hydra's error (exit 1, multirun.yaml left), a bad Optuna range Optuna's traceback."""
    from sala_train.config.entries import use_user_config_dirs

    (tmp_path / "experiment").mkdir()
    header = "# @package _global_\n"
    experiments = {
        "sweep": "hydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      train.learning_rate: 1e-3,-1\n",
        "typo": "hydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      train.lerning_rate: 1e-3,2e-3\n",
        "search": "defaults:\n  - override /hydra/sweeper: optuna\nhydra:\n  mode: MULTIRUN\n  sweeper:\n"
        "    n_trials: 2\n    params:\n      train.learning_rate: tag(log, interval(-1e-5, 3e-3))\n",
        "fine": "hydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      train.learning_rate: 1e-3,2e-3\n",
    }
    for name, text in experiments.items():
        (tmp_path / "experiment" / f"{name}.yaml").write_text(header + text)
    try:
        found = {
            name: problems_of("-cd", str(tmp_path), f"experiment={name}") for name in experiments if name != "fine"
        }
        passes("-cd", str(tmp_path), "experiment=fine")
    finally:
        use_user_config_dirs([])
    assert found == {
        "sweep": ["hydra.sweeper.params searches train.learning_rate=1e-3,-1; at -1: train.learning_rate: must be > 0, "
                  "got -1.0"],
        "typo": ["hydra.sweeper.params searches train.lerning_rate, which this config does not have"],
        "search": ["hydra.sweeper.params searches train.learning_rate=tag(log, interval(-1e-5, 3e-3)): a log-scale "
                   "interval's low end must be above 0; got -1e-05"],
    }  # fmt: skip


def test_search_presets_cannot_be_swept():
    """-m hparams_search=a,b: one preset's keys were checked against the other, a misleading line."""
    assert problems_of("-m", "hparams_search=lora_optuna,full_optuna") == [
        "hparams_search=lora_optuna,full_optuna: a search preset chooses the sweeper, which runs one search per "
        "command; run one command for each (hparams_search=ONE)"
    ]
