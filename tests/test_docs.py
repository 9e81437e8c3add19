"""The docs say what the code does: docs/flags.md is what tools/flags_doc.py makes of the config dataclasses; every
command in README.md and docs/ names a real script or module and real flags; every relative link resolves
(tools/doc_check.py). The checker itself is tested on a page with one mistake of each kind."""
import textwrap

from tools import doc_check, flags_doc


def test_flags_page_is_current():
    page = flags_doc.PAGE.read_text(encoding="utf-8") if flags_doc.PAGE.is_file() else ""
    assert page == flags_doc.render(), "docs/flags.md is stale: run python -m tools.flags_doc --write"


def test_flags_page_lists_every_field_and_every_preset():
    page = flags_doc.render()
    import train_dit
    import train_ldm
    for module in (train_dit, train_ldm):
        for name in module.FAMILY.config.__dataclass_fields__:
            assert f"`--{name.replace('_', '-')}`" in page, name
        for preset in module.PRESETS:
            assert f"#### `--preset {preset}`" in page, preset
    assert "| `--optimizer` | `muon` | experiment |" in page and "| `--optimizer` | `adamw` | experiment |" in page
    assert "--model DiT-XL/2 --image-size 256 --num-classes 1000" in page       # what dit-xl2-in1k sets


def test_documented_commands_and_links_check_out():
    problems = [p for page in doc_check.doc_files() for p in doc_check.page_problems(page)]
    assert problems == []


PAGE = textwrap.dedent('''\
    # Page
    ## A heading
    ```bash
    python train_dit.py --corrupt 0.05 --no-such-flag 1 \\
        --cep sideways            # a comment: --not-checked
    torchrun --nproc_per_node 8 evaluate.py runs/x.pt --cfg-scales 1.5 --nope
    python -m weights.nothing --x
    python missing_script.py && python -m pytest -q --anything
    python evaluate.py runs/x.pt --features "$(python -m scoring.judge path --bad-judge-flag)" --ref r.npz
    python sweep.py --preset smoke --train "--steps 3 --bogus-train" --eval "--cfg-scales 1 --bogus-eval"
    python -m tools.bench --script train_ldm --model unet-tiny --not-a-train-flag
    python -m scoring.judge ref --num 5 --out x.npz ...
    python -c "print('--nope')"
    ```
    ```python
    python = "--not a command"
    ```
    [a](missing.md) [b](#no-such-heading) [c](#a-heading) [d](https://example.com/x.md) `[e](in-code.md)`
    [f](sub/page.md#there) [g](sub/page.md#nowhere) <img src="sub/missing.png">
    ''')


def test_checker_finds_each_kind_of_mistake(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "page.md").write_text("# Sub\n## There\n")
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    assert doc_check.page_problems(page, tmp_path) == [
        "page.md:4: train_dit.py: --no-such-flag is not a flag of it",
        "page.md:4: train_dit.py: --cep sideways: not one of none, uniform, gaussian",
        "page.md:6: evaluate.py: --nope is not a flag of it",
        "page.md:7: python -m weights.nothing: no such module",
        "page.md:8: missing_script.py: no such script",
        "page.md:9: scoring.judge: --bad-judge-flag is not a flag of it",
        "page.md:10: sweep.py --train (train_dit.py): --bogus-train is not a flag of it",
        "page.md:10: sweep.py --eval (evaluate.py): --bogus-eval is not a flag of it",
        "page.md:11: tools.bench: --not-a-train-flag is not a flag of it",
        "page.md:18: link missing.md: no such file",
        "page.md:18: link #no-such-heading: no heading with that anchor in page.md",
        "page.md:19: link sub/page.md#nowhere: no heading with that anchor in sub/page.md",
        "page.md:19: link sub/missing.png: no such file",
    ]


def test_anchors_follow_github():
    text = "# LDM-4 (`train_ldm.py`)\n## Sweeps: sweep.py\n## Sweeps: sweep.py\n```\n# not a heading\n```\n"
    assert doc_check.anchors(text) == {"ldm-4-train_ldmpy", "sweeps-sweeppy", "sweeps-sweeppy-1"}
