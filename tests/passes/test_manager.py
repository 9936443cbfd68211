"""The pass manager: numbered IR dumps (by argument, by the MXC_DUMP_IR flag and through
`mxc.compile`), per-pass timings, unknown pass names, and a pass that breaks the graph being
caught by the verifier at that pass, with a reproducer written."""

from __future__ import annotations

import pytest
import torch

import mxc
from mxc.ir import VerificationError, flags, parse, verify
from mxc.passes import PASSES, PassError, run_pipeline
from mxc.passes.canonicalize import canonicalize


def dump_files(directory):
    return sorted(p.name for p in directory.iterdir())


def check_dumps(directory, first_text, last_text):
    """00-capture.mxir and 01-canonicalize.mxir exist, parse back identically, and hold the
    pipeline's input and result."""
    assert dump_files(directory) == ["00-capture.mxir", "01-canonicalize.mxir"]
    texts = [(directory / name).read_text() for name in dump_files(directory)]
    for text in texts:
        assert str(verify(parse(text))) == text
    assert texts[0] == first_text
    assert texts[1] == last_text
    assert "rms_norm(" in texts[1] and "rms_norm(" not in texts[0]


def test_run_pipeline_dumps_every_pass(captured_tiny_llama, tmp_path):
    graph = captured_tiny_llama.graph
    result = run_pipeline(graph, ["canonicalize"], verify=True, dump_dir=tmp_path / "dumps")
    check_dumps(tmp_path / "dumps", str(graph), str(result.graph))
    assert result.dumps == [tmp_path / "dumps" / "00-capture.mxir", tmp_path / "dumps" / "01-canonicalize.mxir"]
    assert not list((tmp_path / "dumps").glob("*.tmp"))  # written atomically, nothing left behind
    assert str(result.graph) == str(canonicalize(graph))


def test_run_pipeline_without_dumps_writes_nothing(captured_tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MXC_DUMP_IR", raising=False)
    result = run_pipeline(captured_tiny_llama.graph, ["canonicalize"])
    assert result.dumps == [] and list(tmp_path.iterdir()) == []


def test_dump_ir_flag_env_var(captured_tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MXC_DUMP_IR", str(tmp_path / "env"))
    result = run_pipeline(captured_tiny_llama.graph, ["canonicalize"])
    check_dumps(tmp_path / "env", str(captured_tiny_llama.graph), str(result.graph))


def test_dump_ir_flag_through_compile(tiny_llama, tmp_path):
    with flags.DUMP_IR.override(str(tmp_path / "flag")):
        compiled = mxc.compile(tiny_llama, dump_ir=None)
    dumped = tmp_path / "flag"
    assert dump_files(dumped) == ["00-capture.mxir", "01-canonicalize.mxir"]
    assert (dumped / "01-canonicalize.mxir").read_text() == compiled.ir
    capture_text = (dumped / "00-capture.mxir").read_text()
    assert str(verify(parse(capture_text))) == capture_text
    assert str(canonicalize(parse(capture_text))) == compiled.ir
    # the compiled model runs the dumped graph
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, tiny_llama(ids).logits, rtol=1e-5, atol=1e-5)


def test_dump_ir_argument_wins_over_flag(tiny_llama, tmp_path):
    with flags.DUMP_IR.override(str(tmp_path / "flag")):
        mxc.compile(tiny_llama, dump_ir=tmp_path / "arg")
    assert dump_files(tmp_path / "arg") == ["00-capture.mxir", "01-canonicalize.mxir"]
    assert not (tmp_path / "flag").exists()


def test_timings_per_pass(captured_tiny_llama):
    def identity(graph):
        return graph

    table = {**PASSES, "identity": identity}
    result = run_pipeline(captured_tiny_llama.graph, ["canonicalize", "identity"], passes=table)
    assert list(result.timings) == ["canonicalize", "identity"]
    assert all(isinstance(t, float) and t >= 0 for t in result.timings.values())
    assert result.timings["canonicalize"] > 0


def test_unknown_pass_name_lists_valid_names(captured_tiny_llama):
    with pytest.raises(PassError) as info:
        run_pipeline(captured_tiny_llama.graph, ["canonicalize", "canonicalise"])
    msg = str(info.value)
    assert "'canonicalise'" in msg and "canonicalize" in msg.split("expected")[1]
    custom = {"a": canonicalize, "b": canonicalize}
    with pytest.raises(PassError, match=r"unknown pass\(es\) \['canonicalize'\]; expected names from \['a', 'b'\]"):
        run_pipeline(captured_tiny_llama.graph, ["a", "canonicalize"], passes=custom)


def break_linear(graph):
    """A broken pass: declares the first linear's result one column too wide."""
    def rewrite(node):
        if node.op == "linear" and not done:
            done.append(node)
            t = node.types[0]
            return node.replace(types=[t.with_shape((*t.shape[:-1], t.shape[-1] + 1))])
        return None

    done: list = []
    return graph.rewrite(rewrite)


def test_broken_pass_is_caught_at_that_pass_with_a_reproducer(captured_tiny_llama, tmp_path):
    table = {**PASSES, "break_linear": break_linear, "identity": lambda g: g}
    names = ["canonicalize", "break_linear", "identity"]
    with pytest.raises(PassError) as info:
        run_pipeline(captured_tiny_llama.graph, names, verify=True, dump_dir=tmp_path, passes=table)
    msg = str(info.value)
    assert "pass 'break_linear' failed" in msg and "@LlamaForCausalLM" in msg
    assert "linear(" in msg and "result 0 declared f32[b, s, 73]" in msg and "f32[b, s, 72]" in msg
    assert isinstance(info.value.__cause__, VerificationError)
    assert str(tmp_path / "reproducer.mxir") in msg
    # the dumps stop at the last good pass; the reproducer is that pass's input and the rest
    assert dump_files(tmp_path) == ["00-capture.mxir", "01-canonicalize.mxir", "reproducer.mxir", "reproducer.passes"]
    reproducer = (tmp_path / "reproducer.mxir").read_text()
    assert reproducer == (tmp_path / "01-canonicalize.mxir").read_text()
    assert (tmp_path / "reproducer.passes").read_text().split() == ["break_linear", "identity"]
    # the reproducer reproduces: its passes on its graph fail the same way
    graph = verify(parse(reproducer))
    with pytest.raises(PassError, match="pass 'break_linear' failed"):
        run_pipeline(graph, (tmp_path / "reproducer.passes").read_text().split(), verify=True, passes=table)
    # without verification the broken graph goes through unnoticed
    result = run_pipeline(graph, ["break_linear"], verify=False, passes=table)
    with pytest.raises(VerificationError):
        verify(result.graph)


def test_broken_pass_caught_under_debug_flag_without_dump_dir(captured_tiny_llama, monkeypatch):
    monkeypatch.delenv("MXC_DUMP_IR", raising=False)
    table = {**PASSES, "break_linear": break_linear}
    with flags.DEBUG.override(True), pytest.raises(PassError) as info:
        run_pipeline(captured_tiny_llama.graph, ["break_linear"], passes=table)
    assert "pass 'break_linear'" in str(info.value) and "MXC_DUMP_IR" in str(info.value)


def test_raising_pass_is_named(captured_tiny_llama, tmp_path):
    def explode(graph):
        raise ValueError("no luck")

    table = {**PASSES, "explode": explode}
    with pytest.raises(PassError, match=r"pass 'explode' failed on graph @LlamaForCausalLM: no luck") as info:
        run_pipeline(captured_tiny_llama.graph, ["canonicalize", "explode"], dump_dir=tmp_path, passes=table)
    assert isinstance(info.value.__cause__, ValueError)
    assert (tmp_path / "reproducer.passes").read_text() == "explode\n"
    assert (tmp_path / "reproducer.mxir").read_text() == (tmp_path / "01-canonicalize.mxir").read_text()
