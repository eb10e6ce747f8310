"""JSON schemas (flat to nested) and regexes with a question each, for the grammar tests
(tests/engine/test_structured_output.py, test_grammar_batching.py) and
the grammar benchmark. Strings, arrays and numbers are bounded where a 135M model would
otherwise write until max_new_tokens (the one case where TGI's output may not parse either)."""

NAME = {"type": "string", "maxLength": 20}
SHORT = {"type": "string", "maxLength": 30}
SMALL_INT = {"type": "integer", "minimum": 0, "maximum": 1000}
PERSON = {"type": "object", "properties": {"name": NAME, "age": SMALL_INT},
          "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
ADDRESS = {"type": "object", "properties": {"street": SHORT, "city": NAME, "zip": {
    "type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["street", "city", "zip"],
    "additionalProperties": False}  # fmt: skip


def obj(properties: dict, required: list[str] | None = None) -> dict:
    """A closed object whose listed (default: all) properties are required."""
    return {"type": "object", "properties": properties, "additionalProperties": False,
            "required": list(properties) if required is None else required}  # fmt: skip


def array(items: dict, max_items: int = 3) -> dict:
    return {"type": "array", "items": items, "minItems": 1, "maxItems": max_items}


# (question, schema), flat first, nested last.
JSON_CASES: list[tuple[str, dict]] = [
    ("Describe a person named John who is 30.", PERSON),
    ("What is the capital of France?", obj({"capital": NAME, "country": NAME})),
    ("Is the sky blue?", obj({"answer": {"type": "boolean"}})),
    ("How many legs does a spider have?", obj({"legs": SMALL_INT})),
    (
        "What is pi to two decimals?",
        obj({"pi": {"type": "string", "pattern": "^[0-9]\\.[0-9]{2}$"}}),
    ),  # fmt: skip
    ("Pick a primary color.", obj({"color": {"enum": ["red", "green", "blue"]}})),
    (
        "Rate the movie Titanic.",
        obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "verdict": SHORT}),
    ),  # fmt: skip
    ("Give a yes or no answer: is water wet?", obj({"answer": {"const": "yes"}})),
    (
        "Name a fruit and its color.",
        obj(
            {"fruit": NAME, "color": NAME, "sweet": {"type": "boolean"}},
            required=["fruit", "color"],
        ),
    ),  # fmt: skip
    ("Describe a cat.", obj({"name": NAME, "age": {"anyOf": [SMALL_INT, {"type": "null"}]}})),
    ("List three colors.", obj({"colors": array(NAME)})),
    ("Give me the first three prime numbers.", obj({"primes": array(SMALL_INT)})),
    ("Where does Alice live?", obj({"name": NAME, "address": ADDRESS})),
    ("Describe a family of two people.", obj({"members": array(PERSON, 2)})),
    (
        "Describe a book.",
        obj(
            {
                "title": SHORT,
                "author": PERSON,
                "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
            }
        ),
    ),  # fmt: skip
    (
        "Describe a company.",
        obj({"company": obj({"name": NAME, "ceo": PERSON, "office": ADDRESS})}),
    ),  # fmt: skip
    (
        "Give a shopping list with quantities.",
        obj({"items": array(obj({"item": NAME, "quantity": SMALL_INT}))}),
    ),  # fmt: skip
    (
        "Describe a movie with its director and two actors.",
        obj({"movie": obj({"title": SHORT, "director": PERSON, "actors": array(PERSON, 2)})}),
    ),  # fmt: skip
    (
        "Give a point on a map.",
        {
            "$defs": {"coordinate": {"type": "number", "minimum": -180, "maximum": 180}},
            **obj({"lat": {"$ref": "#/$defs/coordinate"}, "lon": {"$ref": "#/$defs/coordinate"}}),
        },
    ),  # fmt: skip
    (
        "Describe a pet: a dog or a fish.",
        obj(
            {
                "pet": {
                    "oneOf": [
                        obj({"kind": {"const": "dog"}, "barks": {"type": "boolean"}}),
                        obj({"kind": {"const": "fish"}, "fins": SMALL_INT}),
                    ]
                }
            }
        ),
    ),  # fmt: skip
    (
        "Describe a tree of two levels.",
        obj(
            {
                "root": obj(
                    {
                        "label": NAME,
                        "children": array(obj({"label": NAME, "leaf": {"type": "boolean"}}), 2),
                    }
                )
            }
        ),
    ),  # fmt: skip
    (
        "Describe a weekly schedule for Monday.",
        obj(
            {
                "schedule": obj(
                    {
                        "day": {"enum": ["Monday", "Tuesday"]},
                        "events": array(
                            obj(
                                {
                                    "time": {
                                        "type": "string",
                                        "pattern": "^[0-2][0-9]:[0-5][0-9]$",
                                    },
                                    "what": SHORT,
                                }
                            ),
                            2,
                        ),
                    }
                )
            }
        ),
    ),  # fmt: skip
]

# (question, regex): the whole output must match.
REGEX_CASES: list[tuple[str, str]] = [
    ("Give me a phone number.", r"\d{3}-\d{3}-\d{4}"),
    ("What is the date today?", r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"),
    ("Is Paris in France? Answer yes or no.", r"(yes|no)"),
    ("Give me an email address.", r"[a-z]{1,10}@[a-z]{1,10}\.(com|org)"),
    ("What time is it?", r"([01][0-9]|2[0-3]):[0-5][0-9]"),
    ("Write one short sentence about the sea.", r"[A-Z][a-z ,]{1,60}\."),
]
