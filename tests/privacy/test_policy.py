"""Privacy policy file: every error path of load_policy, every decline reason of check."""

import pytest

from privacy.policy import Decision, PrivacyPolicy, load_policy

GOOD = """
[policy]
max_epsilon = 8.0
delta = 1e-5
min_noise_multiplier = 0.5
max_rounds = 100
accountant = "rdp"
"""


def write(tmp_path, text):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_load_full_and_minimal_policy(tmp_path):
    assert load_policy(write(tmp_path, GOOD)) == PrivacyPolicy(
        max_epsilon=8.0, delta=1e-5, min_noise_multiplier=0.5, max_rounds=100, accountant="rdp")
    minimal = load_policy(write(tmp_path, "[policy]\nmax_epsilon = 3\n"))
    assert minimal == PrivacyPolicy(max_epsilon=3.0)
    assert isinstance(minimal.max_epsilon, float) and minimal.accountant == "prv"
    assert minimal.delta_for(600) == pytest.approx(1 / 6000)
    assert load_policy(write(tmp_path, GOOD)).delta_for(600) == 1e-5


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(FileNotFoundError, match=f"privacy policy file {path} does not exist"):
        load_policy(path)


@pytest.mark.parametrize("text,needle", [
    ("[policy\nmax_epsilon = 8", ": not valid TOML:"),
    ("max_epsilon = 8\n", ": unknown table(s) or key(s) ['max_epsilon']"),
    ("[other]\nx = 1\n", ": unknown table(s) or key(s) ['other']"),
    ("", ": missing [policy] table"),
    ("policy = 3\n", ": policy must be a table, got 3"),
    ("[policy]\nmax_epsilon = 8\nmax_epsilonn = 9\n", ": unknown key(s) policy.max_epsilonn"),
    ("[policy]\ndelta = 1e-5\n", ": missing key policy.max_epsilon"),
    ('[policy]\nmax_epsilon = "8"\n', ": policy.max_epsilon must be float, got '8'"),
    ("[policy]\nmax_epsilon = 8\nmax_rounds = 10.5\n", ": policy.max_rounds must be int, got 10.5"),
    ("[policy]\nmax_epsilon = 8\naccountant = 1\n", ": policy.accountant must be str, got 1"),
    ("[policy]\nmax_epsilon = true\n", ": policy.max_epsilon must be float, got True"),
    ("[policy]\nmax_epsilon = 0\n", ": policy.max_epsilon must be finite and > 0, got 0.0"),
    ("[policy]\nmax_epsilon = inf\n", ": policy.max_epsilon must be finite and > 0, got inf"),
    ("[policy]\nmax_epsilon = 8\ndelta = 1.0\n", ": policy.delta must be in (0, 1) or absent, got 1.0"),
    ("[policy]\nmax_epsilon = 8\nmin_noise_multiplier = -0.1\n",
     ": policy.min_noise_multiplier must be finite and >= 0, got -0.1"),
    ("[policy]\nmax_epsilon = 8\nmax_rounds = 0\n", ": policy.max_rounds must be >= 1 or absent, got 0"),
    ('[policy]\nmax_epsilon = 8\naccountant = "gdp"\n', ": policy.accountant must be one of ('prv', 'rdp')"),
])
def test_load_errors_name_file_and_key(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as info:
        load_policy(path)
    assert str(info.value).startswith(f"{path}{needle}"), str(info.value)


POLICY = PrivacyPolicy(max_epsilon=8.0, delta=1e-5, min_noise_multiplier=0.5, max_rounds=100)


def test_check_allows_within_every_limit():
    assert POLICY.check(noise_multiplier=0.5, epsilon_after=8.0, rounds_done=99) == Decision(True, "")


def test_check_declines_low_noise():
    decision = POLICY.check(noise_multiplier=0.3, epsilon_after=1.0, rounds_done=0)
    assert decision == Decision(False, "noise_multiplier 0.3 is below the policy's min_noise_multiplier 0.5")


def test_check_declines_too_many_rounds():
    decision = POLICY.check(noise_multiplier=1.0, epsilon_after=1.0, rounds_done=100)
    assert decision == Decision(False, "round 101 would exceed the policy's max_rounds 100 "
                                       "(100 rounds already spent)")


def test_check_declines_over_budget():
    decision = POLICY.check(noise_multiplier=1.0, epsilon_after=8.0123, rounds_done=5)
    assert decision == Decision(False, "epsilon after this round would be 8.012 (accountant 'prv'), over "
                                       "the policy's max_epsilon 8: the privacy budget would be exceeded")
    assert not POLICY.check(noise_multiplier=1.0, epsilon_after=float("inf"), rounds_done=5).allowed


def test_check_reports_every_violated_limit():
    decision = POLICY.check(noise_multiplier=0.0, epsilon_after=float("inf"), rounds_done=100)
    assert not decision.allowed and decision.reason.count("; ") == 2


def test_check_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epsilon_after must be a number >= 0"):
        POLICY.check(noise_multiplier=1.0, epsilon_after=float("nan"), rounds_done=0)
    with pytest.raises(ValueError, match="rounds_done must be an int >= 0, got -1"):
        POLICY.check(noise_multiplier=1.0, epsilon_after=1.0, rounds_done=-1)
