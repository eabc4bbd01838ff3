"""Configuration: precedence, parsing of every CACHEDIT_* variable, and errors that name the value."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cachedit.config import CacheditConfig, CfgMode, Inner

INT_FIELDS = {
    "CACHEDIT_FN",
    "CACHEDIT_BN",
    "CACHEDIT_WARMUP_STEPS",
    "CACHEDIT_WARMUP_INTERVAL",
    "CACHEDIT_MAX_CACHED_STEPS",
    "CACHEDIT_MAX_CONTINUOUS_CACHED_STEPS",
    "CACHEDIT_ULYSSES",
    "CACHEDIT_RING",
}


def test_defaults_are_cache_dit_dbcache_defaults():
    c = CacheditConfig.resolve({}, {})
    assert (c.Fn, c.Bn, c.threshold, c.warmup_steps, c.warmup_interval) == (8, 0, 0.08, 8, 1)
    assert (c.max_cached_steps, c.max_continuous_cached_steps) == (-1, -1)
    assert c.cfg is CfgMode.AUTO and c.inner is Inner.INDUCTOR and not c.disable


def test_precedence_options_over_env_over_defaults():
    env = {"CACHEDIT_FN": "3", "CACHEDIT_THRESHOLD": "0.2"}
    c = CacheditConfig.resolve({"Fn": 2}, env)
    assert c.Fn == 2 and c.threshold == 0.2 and c.Bn == 0


def test_config_object_replaces_env_and_options_override_it():
    base = CacheditConfig(Fn=4, threshold=0.3)
    c = CacheditConfig.resolve({"config": base, "Bn": 1}, {"CACHEDIT_FN": "7", "CACHEDIT_WARMUP_STEPS": "2"})
    assert (c.Fn, c.threshold, c.Bn, c.warmup_steps) == (4, 0.3, 1, 8)


@given(
    fn=st.integers(1, 64),
    bn=st.integers(0, 64),
    thr=st.floats(-1, 2, allow_nan=False),
    warm=st.integers(0, 50),
    interval=st.integers(1, 8),
    m=st.integers(-1, 50),
    mc=st.integers(-1, 50),
    cfg=st.sampled_from(["auto", "batched", "separate", "AUTO"]),
    disable=st.sampled_from(["1", "0", "true", "False", "yes", "off"]),
)
@settings(max_examples=60, deadline=None)
def test_env_round_trip(fn, bn, thr, warm, interval, m, mc, cfg, disable):
    env = {
        "CACHEDIT_FN": str(fn),
        "CACHEDIT_BN": f" {bn} ",
        "CACHEDIT_THRESHOLD": repr(thr),
        "CACHEDIT_WARMUP_STEPS": str(warm),
        "CACHEDIT_WARMUP_INTERVAL": str(interval),
        "CACHEDIT_MAX_CACHED_STEPS": str(m),
        "CACHEDIT_MAX_CONTINUOUS_CACHED_STEPS": str(mc),
        "CACHEDIT_CFG": cfg,
        "CACHEDIT_DISABLE": disable,
        "CACHEDIT_INNER": "eager",
        "CACHEDIT_LOG": "debug",
    }
    c = CacheditConfig.resolve(None, env)
    assert (c.Fn, c.Bn, c.threshold, c.warmup_steps, c.warmup_interval) == (fn, bn, thr, warm, interval)
    assert (c.max_cached_steps, c.max_continuous_cached_steps) == (m, mc)
    assert c.cfg is CfgMode(cfg.lower())
    assert c.disable == (disable.lower() in {"1", "true", "yes", "on"})
    assert c.warmup_step_set == frozenset(range(0, warm, interval))


@pytest.mark.parametrize("var", sorted(INT_FIELDS))
@pytest.mark.parametrize("bad", ["x", "1.5", "", "-5"])
def test_every_int_variable_rejects_bad_values(var, bad):
    # -5 is below every lower bound (the lowest is -1, "no limit")
    with pytest.raises(ValueError) as err:
        CacheditConfig.resolve(None, {var: bad})
    assert var in str(err.value) and repr(bad) in str(err.value)


@pytest.mark.parametrize(
    "var,bad",
    [
        ("CACHEDIT_THRESHOLD", "high"),
        ("CACHEDIT_THRESHOLD", "nan"),
        ("CACHEDIT_CFG", "both"),
        ("CACHEDIT_INNER", "tensorrt"),
        ("CACHEDIT_DISABLE", "maybe"),
        ("CACHEDIT_LOG", "loud"),
        ("CACHEDIT_FP8_COMM", "2"),
        ("CACHEDIT_FN", "0"),
        ("CACHEDIT_WARMUP_INTERVAL", "0"),
    ],
)
def test_every_other_variable_rejects_bad_values(var, bad):
    with pytest.raises(ValueError) as err:
        CacheditConfig.resolve(None, {var: bad})
    assert var in str(err.value) and repr(bad) in str(err.value)


def test_unknown_variable_and_option_suggest_the_right_name():
    with pytest.raises(ValueError, match="Did you mean CACHEDIT_THRESHOLD"):
        CacheditConfig.resolve(None, {"CACHEDIT_TRESHOLD": "0.1"})
    with pytest.raises(ValueError, match="Did you mean 'threshold'"):
        CacheditConfig.resolve({"treshold": 0.1}, {})
    with pytest.raises(TypeError, match="CacheditConfig"):
        CacheditConfig.resolve({"config": {"Fn": 1}}, {})


def test_every_field_has_an_env_variable():
    names = {f.name for f in dataclasses.fields(CacheditConfig)}
    env = {f"CACHEDIT_{n.upper()}" for n in names}
    assert set(INT_FIELDS) <= env
    assert {"CACHEDIT_THRESHOLD", "CACHEDIT_CFG", "CACHEDIT_INNER", "CACHEDIT_DISABLE", "CACHEDIT_LOG"} <= env


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CacheditConfig().Fn = 3


@pytest.mark.parametrize(
    "typo, meant",
    [("fn", "Fn"), ("FN", "Fn"), ("bn", "Bn"), ("Threshold", "threshold"), ("tresholds", "threshold"),
     ("CACHEDIT_FN", "Fn"), ("residual_diff_threshold", "threshold"), ("Fn_compute_blocks", "Fn"),
     ("max_warmup_steps", "warmup_steps")],
)
def test_option_typo_gets_did_you_mean_first(typo, meant):
    # a wrong case, the env-var spelling and cache-dit's DBCache names are all typos of one of ours
    with pytest.raises(ValueError) as err:
        CacheditConfig.resolve({typo: 1}, {})
    assert str(err.value).splitlines()[0].startswith(f"unknown cachedit option {typo!r}. Did you mean {meant!r}?")


def test_env_typo_across_case_gets_did_you_mean():
    with pytest.raises(ValueError, match="^unknown environment variable CACHEDIT_Fn='1'. Did you mean CACHEDIT_FN?"):
        CacheditConfig.resolve(None, {"CACHEDIT_Fn": "1"})


@pytest.mark.parametrize(
    "options, env, first_line",
    [
        ({"Fn": "x"}, {}, "cachedit option Fn='x' is not an integer; expected an integer, e.g. Fn=8"),
        ({"Fn": 0}, {}, "cachedit option Fn=0 is out of range; expected an integer >= 1"),
        ({"threshold": "high"}, {}, "cachedit option threshold='high' is not a number; expected a number, e.g. threshold=0.08"),
        ({"cfg": "both"}, {}, "cachedit option cfg='both' is not accepted; expected one of 'auto', 'batched', 'separate'"),
        (None, {"CACHEDIT_FN": "x"}, "environment variable CACHEDIT_FN='x' is not an integer; expected an integer, e.g. CACHEDIT_FN=8"),
        (None, {"CACHEDIT_BN": "-5"}, "environment variable CACHEDIT_BN='-5' is out of range; expected an integer >= 0"),
        (None, {"CACHEDIT_THRESHOLD": "nan"}, "environment variable CACHEDIT_THRESHOLD='nan' is NaN"),
    ],
)
def test_error_first_line_names_what_the_user_wrote_and_where(options, env, first_line):
    with pytest.raises(ValueError) as err:
        CacheditConfig.resolve(options, env)
    assert str(err.value).splitlines()[0].startswith(first_line), str(err.value)


def test_config_object_errors_name_the_constructor_argument():
    with pytest.raises(ValueError, match=r"^CacheditConfig argument Fn=0 is out of range"):
        CacheditConfig(Fn=0)
    with pytest.raises(ValueError, match=r"^CacheditConfig argument threshold='a' is not a number"):
        CacheditConfig(threshold="a")


def test_per_request_settings_errors_name_the_setting():
    from cachedit.config import request_settings

    with pytest.raises(ValueError, match=r"^per-request setting warmup_steps=-3 is out of range"):
        request_settings({"warmup_steps": -3})
    with pytest.raises(ValueError, match=r"^unknown per-request setting 'Threshold'. Did you mean 'threshold'\?"):
        request_settings({"Threshold": 0.1})
    assert request_settings({"threshold": "0.2", "cfg": "SEPARATE"}) == {"threshold": 0.2, "cfg": CfgMode.SEPARATE}


# --- YAML files ---------------------------------------------------------------------------------------------


def test_yaml_file_through_options_and_environment(tmp_path):
    path = tmp_path / "cachedit.yaml"
    path.write_text("Fn: 2\nthreshold: 0.2\nscm: fast\ncalibrator: taylorseer\n")
    config = CacheditConfig.resolve({"config": str(path), "threshold": 0.3}, environ={"CACHEDIT_BN": "1"})
    assert (config.Fn, config.Bn, config.threshold, config.scm) == (2, 1, 0.3, "fast")  # options > file > env
    # CACHEDIT_CONFIG: the variables override the file
    env = {"CACHEDIT_CONFIG": str(path), "CACHEDIT_FN": "3"}
    config = CacheditConfig.resolve({}, environ=env)
    assert (config.Fn, config.threshold, config.calibrator.value) == (3, 0.2, "taylorseer")


@pytest.mark.parametrize(
    "text, message",
    [
        ("treshold: 0.2\n", r"cachedit.yaml'?: unknown key 'treshold'. Did you mean 'threshold'\?"),
        ("threshold: lots\n", r"cachedit.yaml'?: YAML key threshold='lots' is not a number"),
        ("Fn: 0\n", r"cachedit.yaml'?: YAML key Fn=0 is out of range"),
        ("- Fn\n", r"holds a list; expected a mapping"),
        ("Fn: [1\n", r"is not valid YAML"),
    ],
    ids=["typo", "not-a-number", "out-of-range", "not-a-mapping", "broken"],
)
def test_bad_yaml_names_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "cachedit.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        CacheditConfig.resolve({"config": str(path)}, environ={})
    with pytest.raises(ValueError, match="CACHEDIT_CONFIG="):
        CacheditConfig.resolve({}, environ={"CACHEDIT_CONFIG": str(path)})


def test_missing_yaml_file_says_so(tmp_path):
    with pytest.raises(ValueError, match="cannot read the config file"):
        CacheditConfig.resolve({"config": str(tmp_path / "nope.yaml")}, environ={})
