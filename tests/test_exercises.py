"""One source for exercises, checks that teach, and a fallback so nobody gets stuck."""

import json
from pathlib import Path

import pytest
import torch

from coursekit.checks import QUESTIONS, check, learner_or_reference, run_check, run_implementation, score
from coursekit.course.authoring import PLACEHOLDER, make_exercise, make_exercises, render, strip_solutions

ROOT = Path(__file__).resolve().parents[1]


def test_solution_regions_become_placeholders_with_their_indentation():
    source = "def f(x):\n    ### BEGIN SOLUTION\n    return x + 1\n    ### END SOLUTION\n\nprint(f)"
    assert strip_solutions(source) == f"def f(x):\n    {PLACEHOLDER}\n\nprint(f)"
    hidden = "a = 1\n### BEGIN HIDDEN TESTS\nassert a == 1\n### END HIDDEN TESTS\nb = 2"
    assert strip_solutions(hidden) == "a = 1\nb = 2"
    with pytest.raises(ValueError, match="without a matching"):
        strip_solutions("### END SOLUTION")
    with pytest.raises(ValueError, match="never closed"):
        strip_solutions("### BEGIN SOLUTION\nx = 1")


def test_generation_drops_solution_only_cells_and_outputs_and_is_byte_stable():
    solution = {
        "cells": [
            {
                "cell_type": "markdown",
                "id": "a",
                "metadata": {"tags": ["solution-only"]},
                "source": "the answer",
            },
            {
                "cell_type": "code",
                "id": "b",
                "metadata": {},
                "execution_count": 3,
                "outputs": [{"output_type": "stream", "name": "stdout", "text": "42"}],
                "source": "# NBVAL_CHECK_OUTPUT\nx = 1\n### BEGIN SOLUTION\ny = 2\n### END SOLUTION",
            },
        ],
        "metadata": {"kernelspec": {"name": "python3"}, "widgets": {"state": {}}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    exercise = make_exercise(solution)
    assert len(exercise["cells"]) == 1 and exercise["cells"][0]["outputs"] == []
    assert exercise["cells"][0]["execution_count"] is None and "y = 2" not in exercise["cells"][0]["source"]
    assert "widgets" not in exercise["metadata"]
    assert render(make_exercise(solution)) == render(make_exercise(solution))


def test_committed_exercises_match_their_solutions():
    stale = make_exercises(ROOT / "solutions", ROOT / "exercises", check=True)
    assert stale == [], "run `coursekit make-exercises` and commit the result"
    for path in (ROOT / "exercises").glob("*.ipynb"):
        text = path.read_text()
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
        assert "check(" in text
    assert sorted(p.name for p in (ROOT / "exercises").glob("*.ipynb")) == sorted(
        p.name for p in (ROOT / "solutions").glob("*.ipynb")
    )


NO_EXERCISE = {"00": "the intuition, before any code to write", "09": "the closing map onto diffusers"}


def test_every_notebook_from_01_on_has_an_exercise_with_two_to_five_questions():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        number = path.name[:2]
        if number in NO_EXERCISE:
            continue
        assert (ROOT / "exercises" / path.name).exists(), f"no exercise for {path.name}"
        assert 2 <= len([q for q in QUESTIONS if q.startswith(number + ".")]) <= 5


@pytest.mark.parametrize("question_id", sorted(QUESTIONS))
def test_the_reference_passes_every_check(question_id):
    question = QUESTIONS[question_id]
    result = score(question, run_implementation(question, question.reference))
    assert result.passed and result.points == question.points, repr(result)


def test_checks_name_the_first_mismatch_and_give_a_hint():
    def noisy_image(x0, t, alpha_bar, noise):  # forgets to cast alpha_bar to x0's dtype
        a = alpha_bar[t].reshape(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    result = run_check("01.q2", {"noisy_image": noisy_image})
    assert result.status == "failed" and "expected dtype torch.float32" in result.message and "Hint" in result.message

    def signal_to_noise(alpha_bar):
        return alpha_bar / (1 + alpha_bar)

    result = run_check("01.q3", {"signal_to_noise": signal_to_noise})
    assert result.status == "failed" and "values differ" in result.message and "expected" in result.message


def test_not_implemented_missing_and_crashing_answers_are_told_apart():
    def alpha_bar_from_betas(betas):
        raise NotImplementedError("your code here")

    assert run_check("01.q1", {"alpha_bar_from_betas": alpha_bar_from_betas}).status == "not implemented"
    assert run_check("01.q1", {}).status == "missing"

    def signal_to_noise(alpha_bar):
        return alpha_bar.nonexistent()

    result = run_check("01.q3", {"signal_to_noise": signal_to_noise})
    assert result.status == "failed" and "AttributeError" in result.message


def test_an_answer_that_calls_the_reference_earns_nothing():
    def noisy_image(x0, t, alpha_bar, noise):
        from coursekit.course.bank_part1 import reference_noisy_image

        return reference_noisy_image(x0, t, alpha_bar, noise)

    result = run_check("01.q2", {"noisy_image": noisy_image})
    assert result.points == 0 and result.status == "uses the reference" and "coursekit" in result.message


def test_check_never_raises_unless_strict(monkeypatch, capsys):
    monkeypatch.delenv("COURSEKIT_STRICT", raising=False)
    result = check("01.q1")  # nothing defined here: "missing", printed, not raised
    assert result.status == "missing" and "define alpha_bar_from_betas" in repr(result)
    assert "❓" in repr(result) and "<pre" in result._repr_html_()
    monkeypatch.setenv("COURSEKIT_STRICT", "1")
    with pytest.raises(AssertionError, match="01.q1"):
        check("01.q1")


def test_a_stuck_learner_gets_the_reference_visibly(capsys):
    def signal_to_noise(alpha_bar):
        raise NotImplementedError

    namespace_function = learner_or_reference.__globals__["_caller_namespace"]
    learner_or_reference.__globals__["_caller_namespace"] = lambda: {"signal_to_noise": signal_to_noise}
    try:
        fallback = learner_or_reference("01.q3")
    finally:
        learner_or_reference.__globals__["_caller_namespace"] = namespace_function
    assert "using coursekit's reference" in capsys.readouterr().out
    assert torch.allclose(fallback(torch.tensor([0.5])), torch.tensor([1.0]))


def test_exercise_notebooks_have_no_outputs_and_solutions_are_tested_by_nbval():
    for path in (ROOT / "exercises").glob("*.ipynb"):
        for cell in json.loads(path.read_text())["cells"]:
            assert cell.get("outputs", []) == []
    import tomllib

    testpaths = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["testpaths"]
    assert "solutions" in testpaths and "exercises" not in testpaths


def test_a_local_variable_named_like_a_package_function_is_fine():
    def signal_to_noise(alpha_bar):
        snr = alpha_bar / (1 - alpha_bar)
        return snr

    assert run_check("01.q3", {"signal_to_noise": signal_to_noise}).passed


def test_answers_borrowed_from_the_package_earn_nothing():
    from coursekit.course.bank_part1 import reference_noisy_image

    # not a definition of the learner's own
    assert run_check("01.q2", {"noisy_image": reference_noisy_image}).points == 0
    question = QUESTIONS["01.q2"]
    assert score(question, []).status == "failed"  # incomplete answers never pass


def test_the_sampler_check_needs_the_same_random_draws():
    from coursekit.course.bank_part1 import reference_reverse_step

    def sample(model, x_T, alpha_bar, generator):  # skips the last step: an off-by-one
        x = x_T
        for t in reversed(range(1, len(alpha_bar))):
            eps = model(x, torch.full((x.shape[0],), t))
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = reference_reverse_step(x, t, eps, alpha_bar, z)
        return x

    question = QUESTIONS["04.q2"]
    result = score(question, run_implementation(question, sample))
    assert not result.passed


def test_the_part_two_references_are_the_package_samplers_step_by_step():
    # The exercises' one-step formulas, looped, must give exactly what coursekit's samplers give.
    from coursekit.course.bank_part2 import reference_ddim_step, reference_dpm_solver_step, reference_edit_start
    from coursekit.editing import edit
    from coursekit.forward import predict_x0
    from coursekit.oracle import GaussianOracle
    from coursekit.samplers import ddim_sample, ddim_timesteps, ddpm_sample, dpm_solver_sample
    from coursekit.schedules import make_schedule

    schedule = make_schedule("cosine", 200)
    oracle = GaussianOracle(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 1.5]), schedule)
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    alpha_bar = schedule.alpha_bar.tolist()
    timesteps = ddim_timesteps(200, 12)
    x_ddim, x_dpm, previous_x0_pred, alpha_bar_previous = x_T, x_T, None, None
    for index, t in enumerate(timesteps):
        alpha_bar_next = alpha_bar[timesteps[index + 1]] if index + 1 < len(timesteps) else 1.0
        t_batch = torch.full((64,), t)
        x_ddim = reference_ddim_step(x_ddim, oracle(x_ddim, t_batch), alpha_bar[t], alpha_bar_next)
        x0_pred = predict_x0(x_dpm, t_batch, oracle(x_dpm, t_batch), schedule)
        x_dpm = reference_dpm_solver_step(
            x_dpm, x0_pred, previous_x0_pred, alpha_bar_previous, alpha_bar[t], alpha_bar_next
        )
        previous_x0_pred, alpha_bar_previous = x0_pred, alpha_bar[t]
    assert torch.allclose(x_ddim, ddim_sample(oracle, schedule, x_T, timesteps=timesteps, clip_x0=False), atol=1e-10)
    assert torch.allclose(
        x_dpm, dpm_solver_sample(oracle, schedule, x_T, timesteps=timesteps, clip_x0=False), atol=1e-10
    )

    images = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    generator = torch.Generator().manual_seed(2)
    noise = torch.randn(images.shape, generator=generator)
    x_t, t = reference_edit_start(images, 0.3, schedule.alpha_bar.float(), noise)
    scalar_oracle = GaussianOracle(0.2, 0.5, schedule)
    mine = ddpm_sample(scalar_oracle, schedule, x_t, generator=generator, start_t=t, clip_x0=False)
    theirs = edit(scalar_oracle, schedule, images, 0.3, generator=torch.Generator().manual_seed(2), clip_x0=False)
    assert torch.allclose(mine, theirs, atol=1e-6)


def test_checks_leave_the_learners_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for question_id in ("02.q2", "03.q1", "06.q2", "07.q1"):
        run_check(question_id, {})  # building the cases seeds stand-in models
        QUESTIONS[question_id].cases()
    assert torch.equal(torch.rand(3), expected)
