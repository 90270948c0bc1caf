"""The documentation's results tables are the renderings of the committed JSON, and the check can fail.

    pytest tests/test_report.py      # about a second: reads JSON and markdown, trains nothing
"""
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

from benchmarks import report


def document_blocks():
    return [(name, match["name"]) for name in report.DOCUMENTS
            for match in report.BLOCK.finditer((ROOT / name).read_text())]


@pytest.mark.parametrize("document", report.DOCUMENTS)
def test_every_block_in_the_documents_equals_its_rendering(document):
    text = (ROOT / document).read_text()
    fresh, stale = report.refresh(text)
    assert stale == [], f"{document}: stale blocks {stale}; run python benchmarks/report.py --write"
    assert fresh == text


def test_every_renderer_has_a_block_and_every_pending_block_is_empty():
    names = [name for _, name in document_blocks()]
    assert sorted(set(names)) == sorted([*report.RENDERERS, *report.PENDING]), "a renderer without a block, or the reverse"
    assert not set(report.RENDERERS) & set(report.PENDING)
    for document in report.DOCUMENTS:
        for match in report.BLOCK.finditer((ROOT / document).read_text()):
            if match["name"] in report.PENDING:
                assert match["body"] == "", f"{document}: pending block {match['name']} holds text that no renderer made"


def test_a_block_whose_name_has_no_renderer_fails():
    text = "intro\n" + report.block("no-such-table", "| a |\n|---|\n| 1 |") + "\n"
    with pytest.raises(ValueError, match="no renderer named 'no-such-table'"):
        report.refresh(text)


@pytest.mark.parametrize("text", ["<!-- report:cost -->\n| T |\n", "| T |\n<!-- /report:cost -->\n"])
def test_a_marker_without_its_pair_fails(text):
    with pytest.raises(ValueError, match="unpaired report marker.*cost"):
        report.refresh(text)


def test_a_tampered_number_in_a_copy_of_the_readme_is_detected(tmp_path, capsys):
    text = (ROOT / "README.md").read_text()
    rendered = report.render("quickstart")
    row = next(line for line in rendered.splitlines() if line.startswith("| base, DDIM | 50 |"))
    cfd = row.split(" | ")[2]
    tampered = text.replace(row, row.replace(f"| {cfd} |", f"| {cfd}1 |", 1), 1)
    assert tampered != text
    copy = tmp_path / "README.md"
    copy.write_text(tampered)
    assert report.main(["--check", str(copy)]) == 1
    assert f"stale: {copy}: quickstart" in capsys.readouterr().out
    assert report.main(["--write", str(copy)]) == 0
    assert copy.read_text() == text  # --write restores the rendering
    assert report.main(["--check", str(copy)]) == 0


def test_a_changed_result_in_the_json_makes_its_block_stale(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(report.RESULTS, results)
    record = json.loads((results / "cost.json").read_text())
    record["median_seconds"]["plain_T4"] *= 2
    (results / "cost.json").write_text(json.dumps(record))
    _, stale = report.refresh((ROOT / "benchmarks" / "README.md").read_text(), results)
    # both tables that show plain_T4 move; the headline is the benchmark's own record, not recomputed: it does not
    assert stale == ["cost", "cost-frontier"]


def test_a_missing_json_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'dsd' renders .*dsd\.json, which is missing"):
        report.render("dsd", tmp_path)


@pytest.mark.parametrize("mean, std, expected", [
    (0.028025, 0.000967, "0.0280 ± 0.0010"),  # the std to one digit, the mean to three
    (106.04, 1.15, "106.0 ± 1.1"),  # a std that starts with 1 keeps two digits
    (84320.6, 22696.3, "84,321 ± 22,696"),  # never an exponent
    (0.00177, 0.117, "0.002 ± 0.117"),  # the larger of the two sets the scale
    (6.8232, 0.0006, "6.823 ± 0.001"),  # the mean never beyond four digits
    (float("nan"), float("nan"), "–"),
])
def test_mean_std_formatting(mean, std, expected):
    assert report.mean_std(mean, std) == expected


@pytest.mark.parametrize("value, expected", [(97248, "97,248"), (0.97412, "0.974"), (1324.9, "1,325"), (0.0, "0.00"),
                                             (None, "–"), (float("nan"), "–")])
def test_number_formatting(value, expected):
    assert report.number(value) == expected


def test_gan_goals_need_each_nfe_s_cfd_ratio_and_the_pixel_and_recall_checks():
    def verdict(ratio, pixel=0.9, recall=0.0):
        return {"distance_ratio_mean": ratio, "pixel_ratio_mean": pixel, "recall_delta_mean": recall}
    record = {"verdict_rule": {"cfd_ratio_at_most": 0.9, "pixel_ratio_at_most": 1.0, "recall_drop_at_most": 0.05},
              "plan": {"nfe": [1, 2, 4]}, "recipes": {"digits": {"R": {}}},
              "verdicts": {"digits/R/nfe1 vs base DDIM 50": verdict(1.4),  # <= 1.5: met
                           "digits/R/nfe2 vs base DDIM 50": verdict(0.95, recall=-0.06),  # recall dropped: missed
                           "digits/R/nfe4 vs base DDIM 50": verdict(0.91)}}  # > 0.9: missed
    row = report.quality_gan_goals(record).splitlines()[-1]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1].endswith(": met") and cells[2].endswith("**missed**") and cells[3].endswith("**missed**")


def test_readmes_table1_sentence_follows_the_verdicts_not_a_fixed_text():
    record = json.loads((report.RESULTS / "quality-critic-table1.json").read_text())
    assert "every DDIM recipe loses recall: no recipe enhances" in report.critic_table1_summary(record)
    start = record["verdicts"][f"table1/lcm-ddim-GAN/nfe4 vs {report.LCM_DDIM} 4"]
    start.update(beats=True, recall_delta_mean=0.01)
    sentence = report.critic_table1_summary(record)
    ddim = sum(recipe.startswith("lcm-ddim-") for recipe in record["recipes"]["table1"])
    assert f"{ddim - 1} of {ddim} DDIM recipes lose recall: only `lcm-ddim-GAN` beats the model it starts from" in sentence
