"""pipeline.prompts with Meta's Llama 3.1 Instruct template, checked against the prompt format
written out by hand (Meta's documented layout), not against another renderer."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest

from pipeline.model_files import ModelFileNotFound, resolve_model_file
from pipeline.prompts import ChatTemplate

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO / "pipeline" / "templates" / "llama-3.1-instruct.jinja"
# sha256 of the chat_template of meta-llama/Llama-3.1-8B-Instruct's tokenizer_config.json.
TEMPLATE_SHA256 = "e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65"

BOS = "<|begin_of_text|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"


def header(role):
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def system_block(body="", date="26 Jul 2024", environment="", tools_line=""):
    return header("system") + environment + tools_line + (
        f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n{body}{EOT}"
    )


ASSISTANT_PROMPT = header("assistant")
CALL_FORMAT = 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather <b>&</b> été",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# json.dumps(WEATHER, indent=4), spelled out: no HTML escaping, non-ASCII kept, key order kept.
WEATHER_JSON = """{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather <b>&</b> été",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {
                    "type": "string"
                }
            },
            "required": [
                "city"
            ]
        }
    }
}"""


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(TEMPLATE_PATH.read_text(encoding="utf-8"), bos_token=BOS, eos_token=EOT)


def test_template_file_is_metas_byte_for_byte():
    assert hashlib.sha256(TEMPLATE_PATH.read_bytes()).hexdigest() == TEMPLATE_SHA256


def test_system_and_user(template):
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi!"}]
    expected = (
        BOS
        + system_block("You are a helpful assistant.", date="1 Jan 2025")
        + header("user") + "Hi!" + EOT
        + ASSISTANT_PROMPT
    )
    assert template.render(messages, date_string="1 Jan 2025") == expected


def test_user_only_gets_the_default_system_header(template):
    expected = BOS + system_block() + header("user") + "What is 2 + 2?" + EOT + ASSISTANT_PROMPT
    assert template.render([{"role": "user", "content": "What is 2 + 2?"}]) == expected
    assert template.render([{"role": "user", "content": "What is 2 + 2?"}], date_string=None) == expected


def test_system_and_message_contents_are_trimmed(template):
    messages = [{"role": "system", "content": "  Be brief. \n"}, {"role": "user", "content": "\n Hi \n"}]
    assert template.render(messages) == BOS + system_block("Be brief.") + header("user") + "Hi" + EOT + ASSISTANT_PROMPT


def test_multi_turn_without_generation_prompt(template):
    messages = [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Hello again!"},
    ]
    expected = (
        BOS + system_block()
        + header("user") + "Say hello." + EOT
        + header("assistant") + "Hello!" + EOT
        + header("user") + "Again." + EOT
        + header("assistant") + "Hello again!" + EOT
    )
    assert template.render(messages, add_generation_prompt=False) == expected
    assert template.render(messages) == expected + ASSISTANT_PROMPT


def test_custom_tools_go_into_the_first_user_message(template):
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "user", "content": "Thanks"},
    ]
    expected = (
        BOS
        + system_block("You are a weather bot.", environment="Environment: ipython\n")
        + header("user")
        + "Given the following functions, please respond with a JSON for a function call "
        + "with its proper arguments that best answers the given prompt.\n\n"
        + CALL_FORMAT + "Do not use variables.\n\n"
        + WEATHER_JSON + "\n\n"
        + "Weather in Paris?" + EOT
        + header("assistant") + "Let me check." + EOT
        + header("user") + "Thanks" + EOT
        + ASSISTANT_PROMPT
    )
    assert template.render(messages, tools=[WEATHER]) == expected


def test_tools_in_the_system_message_when_asked(template):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    expected = (
        BOS
        + header("system") + "Environment: ipython\n"
        + "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        + "You have access to the following functions. "
        + "To call a function, please respond with JSON for a function call."
        + CALL_FORMAT + "Do not use variables.\n\n"
        + WEATHER_JSON + "\n\n" + EOT
        + header("user") + "Weather in Paris?" + EOT
        + ASSISTANT_PROMPT
    )
    assert template.render(messages, tools=[WEATHER], tools_in_user_message=False) == expected


def test_tool_call_history_and_tool_results(template):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": {"temperature": 21, "sky": "clear"}},
    ]
    expected = (
        BOS
        + system_block(environment="Environment: ipython\n")
        + header("user")
        + "Given the following functions, please respond with a JSON for a function call "
        + "with its proper arguments that best answers the given prompt.\n\n"
        + CALL_FORMAT + "Do not use variables.\n\n"
        + WEATHER_JSON + "\n\n"
        + "Weather in Paris?" + EOT
        + header("assistant") + '{"name": "get_weather", "parameters": {"city": "Paris"}}' + EOT
        + header("ipython") + '{"temperature": 21, "sky": "clear"}' + EOT
        + ASSISTANT_PROMPT
    )
    assert template.render(messages, tools=[WEATHER]) == expected


def test_tool_and_ipython_results_use_the_ipython_header(template):
    # Meta's template tests `content is iterable`, which strings are: a text result is written
    # as a JSON string, quotes included.
    messages = [
        {"role": "user", "content": "Run it."},
        {"role": "assistant", "content": "Running."},
        {"role": "ipython", "content": "42"},
        {"role": "tool", "content": "done"},
    ]
    expected = (
        BOS + system_block()
        + header("user") + "Run it." + EOT
        + header("assistant") + "Running." + EOT
        + header("ipython") + '"42"' + EOT
        + header("ipython") + '"done"' + EOT
        + ASSISTANT_PROMPT
    )
    assert template.render(messages) == expected


def test_builtin_tools(template):
    messages = [
        {"role": "user", "content": "Search the weather."},
        {
            "role": "assistant",
            "tool_calls": [{"function": {"name": "brave_search", "arguments": {"query": "weather Paris"}}}],
        },
        {"role": "ipython", "content": "sunny"},
    ]
    expected = (
        BOS
        + system_block(environment="Environment: ipython\n", tools_line="Tools: brave_search, wolfram_alpha\n\n")
        + header("user") + "Search the weather." + EOT
        + header("assistant") + '<|python_tag|>brave_search.call(query="weather Paris")' + EOM
        + header("ipython") + '"sunny"' + EOT
        + ASSISTANT_PROMPT
    )
    builtin = ["brave_search", "code_interpreter", "wolfram_alpha"]  # code_interpreter is never listed
    assert template.render(messages, builtin_tools=builtin) == expected


def test_template_errors_surface(template):
    two_calls = {
        "role": "assistant",
        "tool_calls": [
            {"function": {"name": "a", "arguments": {}}},
            {"function": {"name": "b", "arguments": {}}},
        ],
    }
    with pytest.raises(jinja2.TemplateError, match="single tool-calls"):
        template.render([{"role": "user", "content": "x"}, two_calls])
    with pytest.raises(jinja2.TemplateError, match="no first user message"):
        template.render([{"role": "system", "content": "s"}], tools=[WEATHER])
    with pytest.raises(ValueError, match="empty conversation"):
        template.render([])


def test_environment_matches_transformers():
    source = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson(indent=None, sort_keys=true) }}{% endgeneration %}\n"
        "{% endfor %}{{ strftime_now('%Y') | length }}|{{ pad_token is defined }}"
    )
    t = ChatTemplate(source, bos_token="<s>")
    out = t.render([{"role": "u", "content": "<&é>"}, {"b": 1, "a": 2}, {"c": 3}])
    # trim_blocks drops the newline after {% endgeneration %}; the loop stops at the third message.
    assert out == '<s>{"content": "<&é>", "role": "u"}{"a": 2, "b": 1}4|False'
    with pytest.raises(jinja2.exceptions.SecurityError):
        ChatTemplate("{{ messages.append(1) }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(jinja2.TemplateError, match="boom"):
        ChatTemplate("{{ raise_exception('boom') }}").render([{"role": "user", "content": "x"}])


def _model_folder(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_from_model_reads_the_tokenizer_config(tmp_path):
    template = TEMPLATE_PATH.read_text(encoding="utf-8")
    # Special tokens may be stored as serialized AddedTokens.
    config = {"chat_template": template, "bos_token": {"content": BOS, "__type": "AddedToken"}, "eos_token": EOT}
    t = ChatTemplate.from_model(_model_folder(tmp_path / "m", config))
    assert t.source == template
    assert t.special_tokens == {"bos_token": BOS, "eos_token": EOT}
    assert t.render([{"role": "user", "content": "Hi"}]).startswith(BOS + header("system"))


def test_from_model_prefers_chat_template_jinja(tmp_path):
    folder = _model_folder(tmp_path / "m", {"chat_template": "from config", "bos_token": "<s>"})
    (folder / "chat_template.jinja").write_text("{{ bos_token }}from file", encoding="utf-8")
    assert ChatTemplate.from_model(folder).render([{"role": "user", "content": "x"}]) == "<s>from file"


def test_from_model_with_named_templates(tmp_path):
    config = {"chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]}
    folder = _model_folder(tmp_path / "m", config)
    messages = [{"role": "user", "content": "x"}]
    assert ChatTemplate.from_model(folder).render(messages) == "D"
    assert ChatTemplate.from_model(folder, template_name="tool_use").render(messages) == "T"
    with pytest.raises(KeyError, match="tool_use"):
        ChatTemplate.from_model(folder, template_name="nope")


def test_from_model_errors(tmp_path):
    with pytest.raises(ModelFileNotFound, match="has no chat template"):
        ChatTemplate.from_model(_model_folder(tmp_path / "m", {"bos_token": "<s>"}))
    with pytest.raises(ModelFileNotFound, match="tokenizer_config.json not found"):
        ChatTemplate.from_model(tmp_path)
    with pytest.raises(ModelFileNotFound, match="no such model folder"):
        ChatTemplate.from_model(str(tmp_path / "missing" / "deeper" / "model"))


def _hub_cache(root: Path, repo_id: str, files: dict) -> None:
    # The layout huggingface_hub uses: refs/main names the snapshot that holds the files.
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name, text in files.items():
        (snapshot / name).write_text(text, encoding="utf-8")


def test_hub_ids_come_from_the_local_cache(tmp_path, monkeypatch):
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    config = {"chat_template": TEMPLATE_PATH.read_text(encoding="utf-8"), "bos_token": BOS, "eos_token": EOT}
    _hub_cache(tmp_path, "meta-llama/Llama-3.1-8B-Instruct", {"tokenizer_config.json": json.dumps(config)})

    path = resolve_model_file("meta-llama/Llama-3.1-8B-Instruct", "tokenizer_config.json")
    assert path.parent.parent.name == "snapshots"
    rendered = ChatTemplate.from_model("meta-llama/Llama-3.1-8B-Instruct").render([{"role": "user", "content": "Hi"}])
    assert rendered == BOS + system_block() + header("user") + "Hi" + EOT + ASSISTANT_PROMPT

    with pytest.raises(ModelFileNotFound, match="not in the Hugging Face cache"):
        ChatTemplate.from_model("someone/not-downloaded")


def test_module_is_pure():
    code = (
        "import sys, pipeline.prompts, pipeline.model_files;"
        "heavy = {'torch', 'transformers', 'vllm', 'ray', 'huggingface_hub', 'tokenizers'} & set(sys.modules);"
        "sys.exit(f'imported {sorted(heavy)}' if heavy else 0)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
