"""The course machinery, apart from the diffusion pipeline: exercises, checks, grading, pre-flight.

Read in this order; the trust boundary between a submission's code and the grader shows in the names:

- ``engine``: questions, results and comparisons; ``check()`` and ``learner_or_reference()`` for the
  notebooks (``coursekit.checks`` re-exports them for the exercise notebooks).
- ``bank_part1`` (exercises 01-04) and ``bank_part2`` (05-09): each question's reference, cases and hint.
- ``authoring``: exercise notebooks generated from solution notebooks.
- ``screen`` (grader side): which cells of a submission run at all, and which answers need a human look.
- ``sandbox`` (grader side): the process a submission runs in, its OS limits and bubblewrap isolation.
- ``worker`` (submission side): the only code of ours that runs next to the learner's, in the sandbox.
- ``runner`` (grader side): one submission graded; outputs compared with the reference here.
- ``gradebook``: a folder graded into a CSV, feedback files and a Canvas/Moodle export, row by row.
- ``gradescope``: the Gradescope autograder bundle and its results.json.
- ``preflight``: is a learner's machine ready for the course?
"""
