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


NO_EXERCISE = {"00": "the intuition, before any code to write", "12": "the closing map onto diffusers"}


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
    def noise_further(x_s, s, t, alpha_bar, noise):  # the right formula, in float64 on float32 images
        ratio = (alpha_bar[t] / alpha_bar[s]).reshape(-1, *([1] * (x_s.ndim - 1)))
        return ratio.sqrt() * x_s + (1 - ratio).sqrt() * noise + 0 * x_s.double()

    result = run_check("01.q2", {"noise_further": noise_further})
    assert result.status == "failed" and "expected dtype torch.float32" in result.message
    assert result.message.startswith("case 1 of 3") and "cast the ratio to x_s's dtype" in result.message

    def signal_to_noise(alpha_bar):
        return alpha_bar / (1.5 - alpha_bar)

    result = run_check("01.q3", {"signal_to_noise": signal_to_noise})
    assert result.status == "failed" and "values differ" in result.message and "Hint" in result.message


def test_not_implemented_missing_and_crashing_answers_are_told_apart():
    def betas_from_alpha_bar(alpha_bar):
        raise NotImplementedError("your code here")

    assert run_check("01.q1", {"betas_from_alpha_bar": betas_from_alpha_bar}).status == "not implemented"
    assert run_check("01.q1", {}).status == "missing"

    def signal_to_noise(alpha_bar):
        return alpha_bar.nonexistent()

    result = run_check("01.q3", {"signal_to_noise": signal_to_noise})
    assert result.status == "failed" and "AttributeError" in result.message


def test_an_answer_that_calls_the_reference_earns_nothing():
    def noise_further(x_s, s, t, alpha_bar, noise):
        from coursekit.course.bank_part1 import reference_noise_further

        return reference_noise_further(x_s, s, t, alpha_bar, noise)

    result = run_check("01.q2", {"noise_further": noise_further})
    assert result.points == 0 and result.status == "uses the reference" and "coursekit" in result.message


def test_check_never_raises_unless_strict(monkeypatch, capsys):
    monkeypatch.delenv("COURSEKIT_STRICT", raising=False)
    result = check("01.q1")  # nothing defined here: "missing", printed, not raised
    assert result.status == "missing" and "define betas_from_alpha_bar" in repr(result)
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
    from coursekit.course.bank_part1 import reference_noise_further

    # not a definition of the learner's own
    assert run_check("01.q2", {"noise_further": reference_noise_further}).points == 0
    question = QUESTIONS["01.q2"]
    assert score(question, []).status == "failed"  # incomplete answers never pass


def test_the_references_agree_with_the_package_and_with_each_other():
    """Each reference against something independent: coursekit's samplers, or a relation between formulas."""
    from coursekit.course import bank_part1 as one
    from coursekit.course import bank_part2 as two
    from coursekit.editing import edit
    from coursekit.forward import add_noise, posterior_mean_variance, predict_x0
    from coursekit.oracle import GaussianOracle
    from coursekit.samplers import ddim_sample, ddim_timesteps, ddpm_sample, dpm_solver_sample
    from coursekit.schedules import make_schedule

    one._check_embedding_reference()
    schedule = make_schedule("cosine", 200)
    alpha_bar = schedule.alpha_bar
    assert torch.allclose(one.reference_betas(alpha_bar), schedule.betas, atol=1e-12)
    x0 = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps1, eps2 = torch.randn(2, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s, t = torch.tensor([3] * 6), torch.tensor([150] * 6)
    x_s = add_noise(x0, s, schedule, noise=eps1)[0]  # two jumps, 0 -> s -> t, have the law of one jump, 0 -> t
    x_t = one.reference_noise_further(x_s, s, t, alpha_bar, eps2)
    a_s, a_t = alpha_bar[3], alpha_bar[150]
    combined = ((a_t / a_s) * (1 - a_s)).sqrt() * eps1 + (1 - a_t / a_s).sqrt() * eps2  # the noise part
    assert torch.allclose(x_t, a_t.sqrt() * x0 + combined) and torch.isclose(
        (a_t / a_s) * (1 - a_s) + (1 - a_t / a_s), 1 - a_t
    )

    # v-prediction: x0 = sqrt(a) x_t - sqrt(1 - a) v (Salimans & Ho 2022, the inverse of the v target)
    model_outputs = []
    one.reference_v_loss(lambda x, steps: model_outputs.append(x) or x, x0, t, eps1, alpha_bar)
    a = alpha_bar[t].view(-1, 1)
    v = a.sqrt() * eps1 - (1 - a).sqrt() * x0
    assert torch.allclose(a.sqrt() * model_outputs[0] - (1 - a).sqrt() * v, x0)

    # gradient accumulation over 3 micro-batches is one step on the whole batch (SGD: the same weights)
    case = one._cases_training()[2]
    weights = []
    for micro_batches in (1, 3):
        model = one._model_for(case)
        one.reference_accumulated_step(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            case["x0"],
            case["t"],
            case["noise"],
            case["alpha_bar"],
            micro_batches,
        )
        weights.append(model.conv.weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-12)

    # the x0-form reverse step with x0 from the noise guess is coursekit's DDPM step; DDIM with eta = 1 over
    # one step is the same DDPM step (DDIM paper, section 4.1); with eta = 0 it is first-order DPM-Solver
    oracle = GaussianOracle(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 1.5]), schedule)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    steps = torch.full((64,), 120)
    eps = oracle(x, steps)
    x0_pred = predict_x0(x, steps, eps, schedule)
    mean, variance = posterior_mean_variance(x0_pred, x, steps, schedule)
    ddpm = mean + variance.sqrt() * z
    assert torch.allclose(one.reference_reverse_step_from_x0(x, 120, x0_pred, alpha_bar, z), ddpm, atol=1e-12)
    a_t, a_prev = alpha_bar[120].item(), alpha_bar[119].item()
    assert torch.allclose(two.reference_ddim_step(x, eps, a_t, a_prev, 1.0, z), ddpm, atol=1e-10)
    assert torch.allclose(
        two.reference_ddim_step(x, eps, a_t, alpha_bar[60].item(), 0.0, z),
        two.reference_dpm_solver_eps_step(x, eps, None, None, a_t, alpha_bar[60].item()),
        atol=1e-12,
    )

    # the x0-predicting sampler, looped, is coursekit's DDPM sampler with the same draws
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    guesser = one._CleanImageGuesser({"alpha_bar": alpha_bar, "data_mean": oracle.mean, "data_std": oracle.std})
    mine = one.reference_sample(guesser, x_T, alpha_bar, torch.Generator().manual_seed(5))
    theirs = ddpm_sample(oracle, schedule, x_T, generator=torch.Generator().manual_seed(5), clip_x0=False)
    assert torch.allclose(mine, theirs, atol=1e-8)

    # DPM-Solver-2M in the noise form is of higher order than DDIM: 8 times the steps cut its error by more
    # than 16 (DDIM's by 8), and it lands where coursekit's DPM-Solver++ (the data form) lands
    def eps_solver(num_steps):
        timesteps = ddim_timesteps(200, num_steps)
        values = alpha_bar.tolist()
        x, previous_eps, previous_alpha_bar = x_T, None, None
        for index, step in enumerate(timesteps):
            following = values[timesteps[index + 1]] if index + 1 < len(timesteps) else 1.0
            eps = oracle(x, torch.full((64,), step))
            x = two.reference_dpm_solver_eps_step(x, eps, previous_eps, previous_alpha_bar, values[step], following)
            previous_eps, previous_alpha_bar = eps, values[step]
        return x

    # the exact probability-flow map for Gaussian data keeps each point's standard score:
    # (x_t - alpha_t m) / sqrt(alpha_t^2 s^2 + sigma_t^2) is the same at every t, and at the end x0 = m + s * score
    a_T = alpha_bar[199]
    exact = oracle.mean + oracle.std * (x_T - a_T.sqrt() * oracle.mean) / (a_T * oracle.std**2 + 1 - a_T).sqrt()
    errors = [(eps_solver(n) - exact).abs().max().item() for n in (10, 20, 40, 80)]
    first_order = [(ddim_sample(oracle, schedule, x_T, timesteps=ddim_timesteps(200, n), clip_x0=False) - exact)
                   .abs().max().item() for n in (10, 80)]  # fmt: skip
    assert errors == sorted(errors, reverse=True) and errors[0] / errors[-1] > 16 > 8 > first_order[0] / first_order[1]
    plus_plus = dpm_solver_sample(oracle, schedule, x_T, timesteps=ddim_timesteps(200, 80), clip_x0=False)
    assert (eps_solver(80) - plus_plus).abs().max() < 2 * errors[-1]

    # a strength per image is coursekit's edit, image by image
    images = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(6)) * 2 - 1
    x_t, steps = two.reference_edit_start(
        images, torch.tensor([0.3, 0.3, 0.3]), alpha_bar.float(), torch.zeros_like(images)
    )
    assert steps.tolist() == [60, 60, 60]
    scalar_oracle = GaussianOracle(0.2, 0.5, schedule)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(images.shape, generator=generator)
    x_t, steps = two.reference_edit_start(images, torch.full((3,), 0.3), alpha_bar.float(), noise)
    mine = ddpm_sample(scalar_oracle, schedule, x_t, generator=generator, start_t=int(steps[0]), clip_x0=False)
    theirs = edit(scalar_oracle, schedule, images, 0.3, generator=torch.Generator().manual_seed(7), clip_x0=False)
    assert torch.allclose(mine, theirs, atol=1e-6)


def test_checks_leave_the_learners_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for question_id in ("02.q2", "03.q1", "03.q2", "08.q2", "09.q1"):
        run_check(question_id, {})  # building the cases seeds stand-in models
        QUESTIONS[question_id].cases()
    assert torch.equal(torch.rand(3), expected)


def test_every_exercise_has_a_written_answer_and_states_its_points():
    from coursekit.checks import written_for
    from coursekit.course.authoring import MARKDOWN_PLACEHOLDER

    for folder in ("solutions", "exercises"):
        for path in sorted((ROOT / folder).glob("*.ipynb")):
            notebook = json.loads(path.read_text())
            number, cells = path.name[:2], notebook["cells"]
            markdown = " ".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "markdown")
            automatic, written = _questions_of(number), written_for(number)
            assert written, f"{path.name}: at least one written answer, graded by hand"
            total = sum(question.points for question in automatic + written)
            assert f"**{total} points**" in markdown, f"{path.name}: the points stated are not {total}"
            for question in automatic:
                assert f"Question {question.id[-1]} ({question.points} points)" in markdown, question.id
            for question in written:
                tagged = [cell for cell in cells if question.tag in cell["metadata"].get("tags", [])]
                assert len(tagged) == 1 and tagged[0]["cell_type"] == "markdown", (path.name, question.id)
                assert question.prompt in markdown and "graded by hand" in markdown
                if folder == "exercises":
                    assert "".join(tagged[0]["source"]).strip() == MARKDOWN_PLACEHOLDER


def _questions_of(number):
    return [question for question in QUESTIONS.values() if question.id.startswith(number + ".")]


def test_the_noise_form_dpm_solver_step_is_diffusers_dpmsolver_2m():
    """Exercise 05.q2, looped, against the reference library's DPM-Solver (noise form, 2nd order multistep)."""
    diffusers = pytest.importorskip("diffusers")
    from coursekit.course.bank_part2 import reference_dpm_solver_eps_step
    from coursekit.oracle import GaussianOracle
    from coursekit.samplers import ddim_timesteps
    from coursekit.schedules import make_schedule

    schedule = make_schedule("linear", 1000)
    oracle = GaussianOracle(torch.tensor([0.5, -1.0, 0.2]), torch.tensor([0.3, 1.5, 0.7]), schedule)
    x_T = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    alpha_bar = schedule.alpha_bar.tolist()
    for num_steps in (5, 20):
        timesteps = ddim_timesteps(1000, num_steps)
        scheduler = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000,
            trained_betas=schedule.betas.numpy(),
            algorithm_type="dpmsolver",
            solver_order=2,
            lower_order_final=False,
            final_sigmas_type="sigma_min",  # diffusers' noise form cannot end at sigma 0: compare the steps before
        )
        scheduler.set_timesteps(timesteps=timesteps)
        theirs, mine = x_T.clone(), x_T.clone()
        previous_eps, previous_alpha_bar = None, None
        for index, t in enumerate(timesteps[:-1]):
            theirs = scheduler.step(
                oracle(theirs, torch.full((16,), t)), scheduler.timesteps[index], theirs
            ).prev_sample
            eps = oracle(mine, torch.full((16,), t))
            mine = reference_dpm_solver_eps_step(
                mine, eps, previous_eps, previous_alpha_bar, alpha_bar[t], alpha_bar[timesteps[index + 1]]
            )
            previous_eps, previous_alpha_bar = eps, alpha_bar[t]
            # diffusers keeps its schedule in float32; ours is float64, hence the tolerance
            assert torch.allclose(mine, theirs, atol=1e-4), (num_steps, t)
