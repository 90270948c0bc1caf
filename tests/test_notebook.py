"""Executes notebooks/walkthrough.ipynb top to bottom (nbclient) and checks what it says: no cell errors,
every figure drawn, and every finding its prose states still holds in this run (the notebook computes
each one into `claims` and its last cell prints them as one JSON line).

    python -m pytest -q -m slow tests/test_notebook.py     # a few minutes; E2EDIFF_THREADS sets the threads (2)
"""
import json
import math
import os
import re

import nbclient
import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "walkthrough.ipynb")
CLAIMS_PREFIX = "claims json: "

# The findings the notebook's prose states, each computed by the cell that shows it.
STATED_CLAIMS = (
    "zero_snr_schedules_end_at_pure_noise",  # section 1: zero SNR ends at alpha-bar = 0, the others above
    "epsilon_with_zero_snr_refused",
    "pure_noise_only_with_zero_snr_and_not_leading",  # "leading" leaks even with zero SNR
    "base_one_and_two_step_samples_near_centre",  # section 2: the training-sampling gap
    "base_improves_with_every_added_step",
    "base_50_steps_on_the_ring_but_less_on_modes_than_data",
    "hand_written_loop_beats_base_at_4_steps",  # section 3: Algorithm 1 written out
    "independent_l2_worse_than_base",  # section 3: couplings on the ring
    "independent_l2_shrinks_to_centre",
    "inversion_l2_and_gan_reach_all_eight_modes",
    "inversion_l2_4_steps_within_2x_of_base_50_steps",
    "gan_beats_l2_on_independent_pairs",
    "gan_on_independent_pairs_beats_base_at_4_steps",
    "same_metric_as_quickstart",  # section 4: digits
    "base_50_steps_within_2x_of_quickstart_base",
    "base_50_steps_draws_every_class",
    "base_2_steps_nearly_one_digit_per_class",
    "every_e2e_2_nfe_beats_base_2_steps_on_cfd_and_pixel",
    "every_e2e_2_nfe_more_diverse_than_base_2_steps",
    "e2e_l2_follows_the_base_50_step_map",
    "losses_with_a_pixel_term_within_1.25x_cfd",
    "perceptual_alone_weakest_loss",
    "digit_grids_at_least_24_px_per_digit",
    "checkpointing_holds_less_than_plain",  # section 5: cost
    "plain_memory_proportional_to_T",
    "truncated_memory_flat_in_T",
)


@pytest.fixture(scope="module")
def executed():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # runs in a copy: the committed notebook keeps the outputs of its own fresh run
    nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "".join(output.get("text", "") for output in outputs)
    return outputs, text


@pytest.mark.slow
def test_walkthrough_runs_top_to_bottom_and_draws_every_figure(executed):
    outputs, text = executed
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 5  # schedule, 2D base, 2D fine-tuned, digit grids, cost: each cell drew its figure
    assert "notebook ran in" in text


@pytest.mark.slow
def test_walkthrough_findings_hold(executed):
    _, text = executed
    lines = [line for line in text.splitlines() if line.startswith(CLAIMS_PREFIX)]
    assert len(lines) == 1, "the last cell prints the claims as one JSON line"
    claims = json.loads(lines[0][len(CLAIMS_PREFIX):])
    assert set(STATED_CLAIMS) <= set(claims), f"claims the test expects but the notebook no longer computes: " \
                                              f"{sorted(set(STATED_CLAIMS) - set(claims))}"
    failed = sorted(name for name, holds in claims.items() if not holds)
    assert not failed, f"findings the notebook states that no longer hold: {failed}"


@pytest.mark.slow
def test_walkthrough_prints_section_4_table_one_row_per_model(executed):
    _, text = executed
    rows = [line for line in text.splitlines() if re.match(r"\| .+ \| CFD -?\d", line)]  # not the header
    models = [row.split(" | ")[0].lstrip("| ") for row in rows]
    assert models[:3] == ["real digits (train split)", "base, DDIM 50 steps", "base, DDIM 2 steps"]
    assert len(models) == 3 + 6  # and one row per end-to-end variant of the loss zoo
    for row in rows:  # | model | CFD x | pixel y | recall z |: every value a finite number
        values = [float(cell.split()[-1]) for cell in row.strip("| ").split(" | ")[1:]]
        assert len(values) == 3 and all(math.isfinite(value) for value in values)
