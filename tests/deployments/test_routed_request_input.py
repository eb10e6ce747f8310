"""The request router reads whatever body a client sent, malformed or not, without raising:
an exception there leaves the request waiting for a replica forever (it is the engine's job
to refuse the body, with TGI's 422). Found by the bad-input battery: a chat content part
whose `text` was a number hung the request."""

from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.routed_request import GENERATION_ROUTES, RoutedRequest, read_routed_request

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "inputs",
                    "parameters",
                    "messages",
                    "prompt",
                    "role",
                    "content",
                    "type",
                    "text",
                    "max_tokens",
                    "max_new_tokens",
                    "max_completion_tokens",
                ]
            ),
            children,
            max_size=4,
        )
    ),  # fmt: skip
    max_leaves=12,
)


KEYS = st.sampled_from(["inputs", "parameters", "messages", "prompt", "max_tokens"])
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": JSON})
MESSAGE = st.fixed_dictionaries({"role": JSON, "content": JSON | st.lists(PART, max_size=3)})
BODY = st.dictionaries(KEYS, JSON) | st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE | JSON, max_size=3)}, optional={"max_tokens": JSON}
)


@settings(max_examples=400, deadline=None)
@given(path=st.sampled_from(sorted(GENERATION_ROUTES)), body=BODY)
def test_any_json_body_is_read_without_raising(path, body):
    routed = read_routed_request(["POST", path, body, {}], {})
    assert isinstance(routed, RoutedRequest) and isinstance(routed.prompt, str)


def test_a_content_part_whose_text_is_not_a_string_is_skipped():
    parts = [{"type": "text", "text": 7}, {"type": "text", "text": "Hi"}]
    body = {"messages": [{"role": "user", "content": parts}]}
    assert read_routed_request(["/v1/chat/completions", body, {}], {}).prompt == "user\nHi\n"
