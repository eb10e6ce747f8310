"""`ray-tgi chat` and the chat page's files, without a server (the integration tests
tests/integration/test_multi_model.py and test_chat_page.py run them against one)."""

import pytest

from deployments.chat_page import ChatPage
from deployments.errors import TGIError
from deployments.launcher import free_port
from serve_app.chat_client import _error_message
from serve_app.cli import main


def test_error_messages_of_both_shapes():
    assert _error_message('{"error": "Input validation error", "error_type": "validation"}') == (
        "Input validation error"
    )
    openai_body = (
        '{"error": {"message": "The model `x` does not exist", "code": "model_not_found"}}'
    )
    assert _error_message(openai_body) == "The model `x` does not exist"
    assert _error_message("Bad Gateway\n") == "Bad Gateway"


def test_chat_against_no_server_exits_1_with_one_line(capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["chat", "Hello", "--url", url]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: {url}: ConnectError")


def test_chat_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as done:
        main(["chat", "--help"])
    assert done.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--url", "--model", "--max-tokens", "--temperature", "--api-key"):
        assert option in usage


def test_the_chat_page_files_come_from_the_package():
    page = ChatPage()
    index = page.response()
    assert index.media_type.startswith("text/html")
    assert b'src="static/chat.js"' in index.body  # relative: works under any route prefix
    assert page.response("chat.js").media_type.startswith("text/javascript")
    assert page.response("chat.css").media_type.startswith("text/css")
    with pytest.raises(TGIError) as missing:
        page.response("../app.py")
    assert missing.value.status_code == 404
