"""Config regexes matched in bounded time: same answers as ``re``, hostile patterns answered or refused fast."""

from __future__ import annotations

import random
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft_core import ConfigError
from peft_core.patterns import block_index, compile_pattern, fullmatch
from peft_core.walk import layer_index, matches

# --- same answers as re, on generated patterns ------------------------------------------------------------

ALPHABET = "aAb._1\n"
CHARS = st.sampled_from([
    "a", "A", "b", r"\.", "_", "1", ".", "[ab]", "[^a.]", "[a-b1]", "[A-Z_]", r"\d", r"\D", r"\w", r"\W", r"\s",
    r"[\d_]", r"[^\w]", r"\n",
])
ANCHORS = st.sampled_from(["^", "$", r"\A", r"\Z", r"\b", r"\B"])
QUANTIFIERS = st.sampled_from(["*", "+", "?", "*?", "+?", "??", "{2}", "{1,3}", "{0,2}?", "{2,}", "{,2}"])
FLAGS = st.sampled_from(["", "(?i)", "(?s)", "(?m)", "(?a)", "(?x)", "(?ims)"])
# Python requires a lookbehind of fixed width: a few characters and anchors.
FIXED = st.lists(st.one_of(CHARS, ANCHORS), max_size=3).map("".join)


def _extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map("|".join),
        inner.map(lambda p: f"({p})"),
        st.tuples(st.sampled_from(["", "i", "s", "m", "-i", "a"]), inner).map(lambda t: f"(?{t[0]}:{t[1]})"),
        st.tuples(inner, QUANTIFIERS).map(lambda t: f"(?:{t[0]}){t[1]}"),
        st.tuples(st.sampled_from(["(?=", "(?!"]), inner).map(lambda t: f"{t[0]}{t[1]})"),
        st.tuples(st.sampled_from(["(?<=", "(?<!"]), FIXED).map(lambda t: f"{t[0]}{t[1]})"),
    )


PATTERNS = st.tuples(FLAGS, st.recursive(st.one_of(CHARS, ANCHORS), _extend, max_leaves=10)).map("".join)
TEXTS = st.lists(st.text(ALPHABET, max_size=8), min_size=1, max_size=6)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=PATTERNS, texts=TEXTS)
def test_same_answers_as_re(pattern, texts):
    try:
        expected = re.compile(pattern)
    except re.error:
        with pytest.raises(ConfigError, match="not a valid regular expression"):
            compile_pattern(pattern)
        return
    compiled = compile_pattern(pattern)
    for text in texts:
        assert compiled.fullmatch(text) == (expected.fullmatch(text) is not None), (pattern, text)


# Patterns from Hugging Face PEFT's docs and from tools that write adapter configs.
REALISTIC = [
    r".*\.(q_proj|v_proj)", r".*decoder.*(SelfAttention|EncDecAttention).*(q|o|v)$",
    r"^(?!.*vision_tower).*(?:q_proj|v_proj).*", r"(?i).*Q_PROJ", r"model\.layers\.\d+\.mlp\..*",
    r".*\.(?:[0-9]|1[0-5])\.self_attn\.(q|k|v|o)_proj", r"^(?!.*(?:lm_head|embed)).*(?:proj)$",
    r".*(?<!mlp\.)(?:up|down)_proj", r"(?:(?!mlp).)*_proj", r".*\b(q|k)_proj\b", r".*layers\.[13]\..*",
    r"model\.layers\.(?P<i>\d+)\.self_attn\.(q|k|v)_proj", r".*(?:self_attn|mlp)\.[a-z_]+", r".*norm$",
    r"(?x) .*\. (?: q_proj | k_proj )  # with comments", r"^model\.(?:layers\.\d+\.)?.*", r".*\.\d{1,2}\..*",
]


@pytest.mark.parametrize("pattern", REALISTIC)
def test_realistic_patterns_on_a_tiny_llama(llama, pattern):
    names = [name for name, _ in llama.named_modules() if name]
    answers = [compile_pattern(pattern).fullmatch(name) for name in names]
    assert answers == [re.fullmatch(pattern, name) is not None for name in names]


def test_lookaround_at_the_start_is_asked_once_per_name():
    pattern = compile_pattern(r"^(?!.*vision_tower).*(?:q_proj|v_proj).*")
    assert pattern.fullmatch("model.language_model.layers.0.self_attn.q_proj")
    assert not pattern.fullmatch("model.vision_tower.layers.0.self_attn.q_proj")
    assert fullmatch(r"(?i)a\.B", "A.b")


# --- hostile patterns --------------------------------------------------------------------------------------

LLAMA_7B = [
    "model", "model.embed_tokens", "model.norm", "lm_head",
    *(f"model.layers.{i}{suffix}" for i in range(32) for suffix in (
        "", ".self_attn", ".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.o_proj",
        ".self_attn.rotary_emb", ".mlp", ".mlp.gate_proj", ".mlp.up_proj", ".mlp.down_proj", ".mlp.act_fn",
        ".input_layernorm", ".post_attention_layernorm", ".self_attn.rotary_emb.inv_freq_buffer_for_tests",
    )),
]
SHORT = ["", "a", "z", "ab", "aab", "aaac", "xxy", "xxxy", "a.z", "q_proj"]
HOSTILE = [
    r"(.|.)*z", r"(a*)*b", r"(x+x+)+y", r"(a|aa)*c", r".*.*.*.*.*.*.*.*z", r"(.*a){20}", r"(?:a{1000}){1000}",
    r"(\w+\s?)*$", r"(?:(?!.*x).)*", r"(?:(?=.*a).)*q", r"(?:.*\.){30}z", r"([a-z_.]+)*\d\d\d",
    r"(?:.*a.*b.*c)+", r".*(?:.{20})z",
    "|".join(f"m{i}x" for i in range(20_000)), "|".join(f".*a{i}" for i in range(20_000)),
    "|".join(f".*a{i}" for i in range(9_000)), "|".join(f"(?:.*a{i}){{2}}" for i in range(5_000)),
]


@pytest.mark.parametrize("pattern", HOSTILE, ids=lambda p: p[:24])
def test_hostile_patterns_answer_or_are_refused_within_a_second(pattern):
    start = time.perf_counter()
    try:
        compiled = compile_pattern(pattern, "target_modules")
        answers = [compiled.fullmatch(name) for name in [*LLAMA_7B, *SHORT]]
    except ConfigError as exc:
        assert repr(pattern)[:40] in str(exc)
        answers = None
    assert time.perf_counter() - start < 1.0
    if answers is not None:  # spot checks on names short enough for re to backtrack through
        assert answers[len(LLAMA_7B):] == [re.fullmatch(pattern, text) is not None for text in SHORT]


def test_a_large_alternation_of_module_names_is_matched():
    # What the diffusers integration writes as target_modules: every module of a large UNet, escaped.
    names = [f"{part}.{i}.attentions.{j}.transformer_blocks.{k}.attn{a}.to_{p}"
             for part in ("down_blocks", "up_blocks") for i in range(3) for j in range(3) for k in range(10)
             for a in (1, 2) for p in ("q", "k", "v", "out.0")]
    pattern = "|".join(re.escape(name) for name in sorted(names))
    compiled = compile_pattern(pattern)
    assert all(compiled.fullmatch(name) for name in names)
    assert not compiled.fullmatch(names[0] + "x") and not compiled.fullmatch("down_blocks.0.resnets.0.conv1")


# --- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "reason"), [
    (r"(a)\1", "backreference"), (r"(?P<x>a)(?P=x)", "backreference"), (r"(a)?(?(1)b|c)", "conditional group"),
    (r"(?>a+)b", "atomic group"), (r"a++b", "possessive repeat"), (r"a{1,3}+", "possessive repeat"),
    (r"model.(", "not a valid regular expression"), (r"[a", "not a valid regular expression"),
    (r"(?<=a+)b", "not a valid regular expression"), (r"a{2,1}", "not a valid regular expression"),
    ("x" * 300_000, "characters long"), (r"(?:a{1000}){1000}", "too large"),
])
def test_refusals_name_the_pattern_and_the_reason(pattern, reason):
    with pytest.raises(ConfigError, match=re.escape(repr(pattern)[:60])) as caught:
        compile_pattern(pattern, "LoraConfig.target_modules")
    assert reason in str(caught.value) and "LoraConfig.target_modules" in str(caught.value)


def test_configs_refuse_such_patterns_when_validated():
    from scale_method import ScaleConfig

    with pytest.raises(ConfigError, match=r"ScaleConfig.target_modules '\(a\)\\\\1' uses a backreference"):
        ScaleConfig(target_modules=r"(a)\1")
    with pytest.raises(ConfigError, match="atomic group"):
        ScaleConfig(exclude_modules=r"(?>x)")
    assert matches("model.layers.0.self_attn.q_proj", r".*q_proj")


def test_an_automaton_too_complex_to_build_is_refused():
    # (a|b)*a(a|b){k}: a DFA needs 2**k states; texts that visit many of them exhaust the work budget.
    pattern = compile_pattern(r"(?:a|b)*a(?:a|b){16}", "target_modules")
    rng = random.Random(0)
    texts = ["".join(rng.choice("ab") for _ in range(40)) for _ in range(3000)]
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="too complex to match in bounded time"):
        for text in texts:
            pattern.fullmatch(text)
    with pytest.raises(ConfigError, match="too complex"):  # and stays refused
        pattern.fullmatch("a")
    assert time.perf_counter() - start < 1.0


# --- block indices -----------------------------------------------------------------------------------------

BLOCK_NAMES = [
    "model.layers.3.self_attn.q_proj", "model.layers.12.mlp", "model.layers.3", "lm_head", "model.embed_tokens",
    "transformer.h.0.attn.c_attn", "transformer.h.11.mlp.c_fc", "transformer.wte",
    "encoder.block.3.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.k",
    "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.10.output.dense",
    "base_model.model.model.layers.7.self_attn.v_proj", "backbone.stages.1.blocks.2.fc",
    "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "h.2.attn", "x.hh.2.y",
]


@pytest.mark.parametrize("pattern", ["layers", "h", "block", "layer", "blocks", "(down|up)_blocks", r"la\w+"])
def test_block_index_agrees_with_hf_peft(pattern):
    for name in BLOCK_NAMES:
        old = re.match(rf"(?:^|.*?\.){pattern}\.(?P<index>\d+)\.", name)
        assert block_index(pattern, name) == (int(old.group("index")) if old else None), name
        assert layer_index(name, pattern) == block_index(pattern, name)


def test_invalid_layers_pattern_is_refused():
    with pytest.raises(ConfigError, match=r"layers_pattern 'stages\[' is not a valid regular expression"):
        layer_index("backbone.stages.1.fc", "stages[")
