"""Repository hygiene: clean committed notebooks, parameters cells, safe loading, no secrets, no API drift."""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import papermill as pm
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOURCES = sorted(path for folder in ("utils", "benchmarks", "scripts", "notebooks/take_home")
                 for path in (ROOT / folder).glob("*.py"))


def _notebook_code(nb: Path) -> str:
    cells = json.loads(nb.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _all_code() -> dict[str, str]:
    code = {str(p.relative_to(ROOT)): p.read_text() for p in SOURCES}
    code.update({str(nb.relative_to(ROOT)): _notebook_code(nb) for nb in NOTEBOOKS})
    return code


def test_the_course_has_four_numbered_notebooks():
    assert [nb.name[:2] for nb in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(nb):
    for cell in json.loads(nb.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "clear outputs before committing"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_is_the_parameters_cell(nb):
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    assert "parameters" in cells[0]["metadata"].get("tags", [])
    params = pm.inspect_notebook(str(nb))
    assert {"PROFILE", "OUTPUT_DIR"} <= set(params)
    assert params["PROFILE"]["default"] == '"auto"'


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_install_and_log_in_nothing(nb):
    code = _notebook_code(nb)
    assert not re.search(r"^\s*[!%]", code, re.M), "no shell or magic commands in notebooks"
    assert "login(" not in code and "HF_TOKEN" not in code


def test_no_remote_code_and_safetensors_only():
    remote = "trust_remote_code" + "=True"
    for name, code in _all_code().items():
        assert remote not in code.replace(" ", ""), name
        assert "torch.load(" not in code, name
        assert "use_safetensors=False" not in code and "safe_serialization=False" not in code, name


def test_no_secrets_in_repository():
    token = re.compile(r"hf_[A-Za-z0-9]{30,}|AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9]{32,}")
    for path in ROOT.rglob("*"):
        if path.is_file() and not any(part in {".venv", ".git", "outputs"} for part in path.parts) \
                and path.suffix in {".py", ".ipynb", ".md", ".toml", ".yml", ".yaml", ".json", ".jsonl", ""}:
            assert not token.search(path.read_text(errors="ignore")), path


def _classes():
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    return {c.__name__: c for c in (LoraConfig, BitsAndBytesConfig, DPOConfig, DPOTrainer, SFTConfig, SFTTrainer)}


def test_every_keyword_we_pass_to_trl_peft_transformers_still_exists():
    """An upgrade that renames an argument fails here with the list, not deep inside a notebook."""
    classes, missing, seen = _classes(), [], 0
    for name, code in _all_code().items():
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in classes:
                accepted = inspect.signature(classes[node.func.id]).parameters
                for kw in node.keywords:
                    seen += 1
                    if kw.arg and kw.arg not in accepted:
                        missing.append(f"{name}: {node.func.id}({kw.arg}=...)")
    assert seen > 40, "the scan found too few calls; did the notebooks move?"
    assert not missing, "arguments no longer accepted: " + ", ".join(missing)


def test_notebook_04_evaluates_one_model_at_a_time_without_unquantized_copies_on_the_host():
    """On rtx4090, load_full_precision puts a 16 GiB bf16 Gemma 7B on the host; load_for_eval: 4-bit on the GPU."""
    code = _notebook_code(ROOT / "notebooks" / "04_dpo.ipynb")
    assert "load_full_precision" not in code and "models.load_for_eval(" in code and "models.free(" in code


def _utils_imports() -> dict[str, set[str]]:
    """{module: the utils modules it imports}, for every utils/*.py, imports inside functions included."""
    modules = {path.stem for path in (ROOT / "utils").glob("*.py")}
    graph = {}
    for name in sorted(modules):
        found = set()
        for node in ast.walk(ast.parse((ROOT / "utils" / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("utils.")}
            elif isinstance(node, ast.ImportFrom):
                module = f"utils.{node.module or ''}".rstrip(".") if node.level else node.module or ""
                if module == "utils":
                    found |= {a.name for a in node.names}
                elif module.startswith("utils."):
                    found.add(module.split(".")[1])
        graph[name] = found & modules - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_utils_modules_import_each_other_without_cycles():
    """A cycle (models -> memory -> models, once) works only while its import sits inside a function."""
    graph = _utils_imports()
    assert {"memory", "recipes"} <= graph["models"] and "memory_plan" in graph["run"], graph  # run's: in a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]  # the check sees one
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


LESSON_CALLS = {
    "02": ["AutoModelForCausalLM.from_pretrained(", "quantization_config=", "get_peft_model(", ".train("],
    "04": ["AutoModelForCausalLM.from_pretrained(", "quantization_config=", "peft_config=", "merge_and_unload(",
           ".train("],
}


def _sections(nb: Path) -> list[list[str]]:
    """The code cells of each `## ` section (the first holds the cells before any)."""
    sections: list[list[str]] = [[]]
    for cell in json.loads(nb.read_text())["cells"]:
        text = "".join(cell["source"])
        if cell["cell_type"] == "markdown" and re.search(r"^## ", text, re.M):
            sections.append([])
        elif cell["cell_type"] == "code":
            sections[-1].append(text)
    return sections


@pytest.mark.parametrize("number", sorted(LESSON_CALLS))
def test_notebooks_02_and_04_show_the_real_calls_with_plumbing_out_of_the_way(number):
    """Issue 24: the calls that make QLoRA and DPO work are in the cells; recording is one call per section at most;
    resuming is one line (no resume.* call); one plain model.generate after left padding."""
    nb = next(p for p in NOTEBOOKS if p.name.startswith(number))
    code = _notebook_code(nb)
    assert [call for call in LESSON_CALLS[number] if call not in code] == []
    assert "resume." not in code and "with resumable(" in code
    generating = [cell for section in _sections(nb) for cell in section if "model.generate(" in cell]
    assert generating and all(cell.index('padding_side = "left"') < cell.index("model.generate(")
                              for cell in generating if 'padding_side = "left"' in cell)
    assert any('padding_side = "left"' in cell for cell in generating)
    for section in _sections(nb):
        calls = sum(len(re.findall(r"report\.record(?:_metrics)?\(", cell)) for cell in section)
        assert calls <= 1, f"{calls} recording calls in one section of {nb.name}: record a section at once"
