"""OpenAI tool calling on the chat route, the way TGI 3.3 does it: with a grammar.

The tools the request allows become one JSON schema: `{"function": {"_name": NAME, ...its
arguments}}`, one alternative per tool, the name first. `tool_choice` "auto" adds a `no_tool`
alternative, by which the model declines to call a tool; the route then answers with a plain
generation instead (TGI's behaviour). The tools and the instructions reach the model at the
end of the last message, or through the chat template when it takes `tools`.

The model writes that JSON; clients get OpenAI's `tool_calls`. `CallText` cuts the
arguments out of the generated text the same way whether it is complete or still streaming,
so the streamed argument deltas add up to exactly the non-streamed arguments.
"""

import json
import re
import uuid
from dataclasses import dataclass

from engine.errors import RequestError
from engine.schemas import ChatRequest, NamedToolChoice, Tool

NO_TOOL = "no_tool"
NO_TOOL_DESCRIPTION = "Open ended response with no specific tool selected"
# TGI's default `tool_prompt` (its OpenAPI spec's example).
DEFAULT_TOOL_PROMPT = (
    "Given the functions available, please respond with a JSON for a function call with its "
    "proper arguments that best answers the given prompt. Respond in the format {name: "
    "function name, parameters: dictionary of argument name and its value}.Do not use "
    "variables."
)
# What the grammar makes the model write first (engine/grammar.py's compact JSON format).
_CALL_START = re.compile(r'\{"function": \{"_name": ("(?:[^"\\]|\\.)*")')
_ARGUMENT_SEPARATOR = ", "


class ToolError(RequestError):
    """TGI's InferError::ToolError: a tool request that cannot be served."""

    status_code = 422
    error_type = "tool_error"

    def __init__(self, message: str):
        super().__init__(f"Tool error: {message}")


@dataclass(frozen=True)
class ToolPlan:
    """The tools the model is offered and the schema its answer must follow."""

    tools: list[Tool]
    schema: dict


def plan_tools(body: ChatRequest) -> ToolPlan | None:
    """The request's tools after `tool_choice`; None when no tool may be called."""
    if not body.tools or body.tool_choice == "none":
        return None
    if body.response_format is not None:
        raise ToolError("`response_format` and `tools` cannot be used together")
    choice = body.tool_choice or "auto"
    if isinstance(choice, NamedToolChoice) or choice not in ("auto", "required"):
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice
        tools = [tool for tool in body.tools if tool.function.name == name]
        if not tools:
            raise ToolError(f"Tool with name {name} not found")
    elif choice == "required":
        tools = list(body.tools)
    else:
        no_tool = {"name": NO_TOOL, "description": NO_TOOL_DESCRIPTION,
                   "parameters": {"type": "object", "properties": {}}}  # fmt: skip
        tools = [*body.tools, Tool.model_validate({"type": "function", "function": no_tool})]
    return ToolPlan(tools, call_schema(tools))


def call_schema(tools: list[Tool]) -> dict:
    """One JSON schema for a call of any of `tools`: {"function": {"_name": NAME, ...args}}."""
    alternatives = []
    definitions: dict = {}  # "#/$defs/..." references resolve from the root: hoist them there
    for tool in tools:
        arguments = tool.function.parameters
        definitions.update(arguments.get("$defs", {}))
        properties = {"_name": {"type": "string", "const": tool.function.name},
                      **arguments.get("properties", {})}  # fmt: skip
        alternatives.append({
            "type": "object",
            "properties": properties,
            "required": ["_name", *arguments.get("required", [])],
            # TGI's rule: extra arguments only when the tool explicitly allows them.
            "additionalProperties": arguments.get("additionalProperties") is True,
        })  # fmt: skip
    schema = {
        "type": "object",
        "properties": {"function": {"anyOf": alternatives}},
        "required": ["function"],
        "additionalProperties": False,
    }
    return {**schema, "$defs": definitions} if definitions else schema


def tools_message_suffix(plan: ToolPlan, tool_prompt: str | None, template_takes_tools: bool):
    """The text TGI appends to the last message: the tools as JSON (unless the template
    renders them itself), then the instructions."""
    prompt = tool_prompt or DEFAULT_TOOL_PROMPT
    if template_takes_tools:
        return f"\n---\n{prompt}"
    tools = json.dumps([tool.model_dump() for tool in plan.tools])
    return f"\n---\n{tools}\n{prompt}"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class CallText:
    """A tool call's text as it grows: the called function's name once it is written, and the
    arguments JSON so far.

    The grammar fixes the layout: `{"function": {"_name": "NAME"` then either `}}` or `, `
    and the arguments' members, then `}}`. The arguments are "{" + those members + "}", which
    is the text after the separator without the last, outer "}".
    """

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self._arguments_start = 0

    def push(self, text: str) -> None:
        self.text += text
        if self.name is None and (match := _CALL_START.match(self.text)):
            self.name = json.loads(match.group(1))
            self._arguments_start = match.end()

    def arguments(self, final: bool) -> str:
        """The arguments written so far. While streaming a trailing "}" is held back, as it
        may be the outer brace; at the end that brace is dropped if the call is complete."""
        rest = self.text[self._arguments_start :]
        if rest.startswith(_ARGUMENT_SEPARATOR):
            rest = rest[len(_ARGUMENT_SEPARATOR) :]
        elif _ARGUMENT_SEPARATOR.startswith(rest):  # "" or "," so far
            rest = ""
        arguments = "{" + rest
        if arguments.endswith("}") and (not final or self.is_complete()):
            arguments = arguments[:-1]
        return arguments

    def is_complete(self) -> bool:
        try:
            json.loads(self.text)
        except json.JSONDecodeError:
            return False
        return True


def tool_call_message(text: str, call_id: str) -> dict | None:
    """The assistant message for a finished tool call, or None if the text names no tool."""
    call = CallText()
    call.push(text)
    if call.name is None:
        return None
    return {"role": "assistant", "tool_calls": [{
        "id": call_id, "type": "function",
        "function": {"name": call.name, "arguments": call.arguments(final=True),
                     "description": None},
    }]}  # fmt: skip
