"""Loaded by the schemathesis CLI in tests/api/test_schema.py (``SCHEMATHESIS_HOOKS``).

The schema states every rule JSON Schema can say (names, token-id and context bounds, one-of fields,
if/then rules between fields). A few refusals depend on what no JSON Schema can state: the bytes of an
uploaded artifact, a prompt's length in tokens against the context, whether a grammar, regex or JSON schema
compiles, and references between values (a named ``tool_choice`` must name a sent tool; tool names are
unique; best_of equals n). This check is schemathesis's ``positive_data_acceptance`` except that it lets a
schema-valid request be refused with 400 for one of those reasons, recognised by the route's own message.
Any other refusal of schema-valid data still fails."""

from __future__ import annotations

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

SEMANTIC_REFUSALS = (
    "Invalid artifact for task",  # the upload's bytes are not an artifact of a supported format
    "was uploaded twice",  # file names are multipart headers, outside the body's schema
    "needs a file name",
    "best_of must equal n",  # an equality between two fields
    "exceeds the model's context",  # prompt tokens + tokens to generate
    "is not one of the tools",  # a named tool_choice must name a sent tool
    "names must be unique",  # tool names
    "is not a JSON schema this server can follow",  # the grammar library compiles tool parameter schemas
    "allows no output",  # a structured-output spec that compiles but that no text can follow
    "--max-tool-prompt-tokens",  # the tools' listing in tokens, as a prompt's length against the context
)


@schemathesis.check
def schema_valid_data_accepted(ctx, response, case):
    """ST202 (positive data acceptance) with the refusals above allowed."""
    if response.status_code == 400 and any(reason in response.text for reason in SEMANTIC_REFUSALS):
        return None
    return positive_data_acceptance(ctx, response, case)
