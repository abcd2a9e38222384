"""One prompt format for inference and training.

The engine and `training/` both build chat prompts here, so that what the model is trained on is
exactly what it sees when an analyst asks. A conversation is a list of ``{"role", "content"}``
messages; the first user message carries the ``<image>`` placeholder, which the processor expands
into the connector's image tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# Kept short on purpose: every prompt token is prefill work before the first answer token (61
# tokens of box-format instructions were a third of the embedded model's prefill on a CPU). The
# box grammar is taught by the grounding training data, not by this sentence.
SYSTEM_PROMPT = "You are a remote-sensing assistant for aerial and satellite images."


def region_prefix(region_box_text: str | None) -> str:
    """How the analyst's drawn rectangle (already in the box grammar) enters the question."""
    return f"In the region {region_box_text}: " if region_box_text else ""


def user_turn(question: str, *, image_token: str | None, region_box_text: str | None = None) -> str:
    """The text of one user message; ``image_token`` is given for the first turn only."""
    text = region_prefix(region_box_text) + question.strip()
    return f"{image_token}\n{text}" if image_token else text


def build_messages(
    turns: Sequence[tuple[str, str | None]],
    *,
    image_token: str,
    system: str | None = SYSTEM_PROMPT,
) -> list[dict[str, str]]:
    """Messages for ``[(user_text, assistant_text_or_None), ...]``; the image goes into turn 1.

    ``user_text`` is the full user text (question with any region prefix, see `user_turn`); a
    final ``None`` answer leaves the conversation open for generation.
    """
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    for i, (user, assistant) in enumerate(turns):
        content = f"{image_token}\n{user}" if i == 0 else user
        messages.append({"role": "user", "content": content})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    return messages


def render(processor: Any, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """Chat-template text of ``messages`` (the processor's template, or its plain fallback)."""
    return processor.build_prompt(messages, add_generation_prompt=add_generation_prompt)


def continuation(
    processor: Any,
    messages_before: list[dict[str, str]],
    answer: str,
    next_user: str,
    *,
    ended_with_eos: bool,
) -> str:
    """Text that follows the tokens already generated for ``answer``, up to the next reply.

    The KV cache of a session holds the prompt plus the generated tokens (the answer and, when
    generation stopped on it, the end-of-turn token). Rendering the longer conversation and cutting
    at the end of the answer gives exactly the text still to be fed: the rest of the template's
    end of turn, the next user message and the generation prompt.
    """
    with_answer = [*messages_before, {"role": "assistant", "content": answer}]
    longer = render(
        processor,
        [*with_answer, {"role": "user", "content": next_user}],
        add_generation_prompt=True,
    )
    closed = render(processor, with_answer, add_generation_prompt=False)
    cut = closed.rfind(answer) + len(answer) if answer else len(closed.rstrip())
    if answer and closed.rfind(answer) < 0:  # a template that rewrites the answer: stop at turn end
        cut = len(closed)
    eos = getattr(processor.tokenizer, "eos_token", None) or ""
    if ended_with_eos and eos:
        rest = longer[cut:]
        stripped = rest.lstrip()
        if stripped.startswith(eos):  # the generated end-of-turn token is already in the cache
            cut += len(rest) - len(stripped) + len(eos)
    return longer[cut:]


#: What the training data (`training.vqa`) asks its one-word answers with.
ONE_WORD = "Answer with a single word or number."
_INSTRUCTION = re.compile(r"\s*Answer with (?:a single word|one word)(?: or number)?\.\s*$", re.I)


def without_instruction(question: str) -> str:
    """``question`` without a trailing "Answer with a single word or number."."""
    return _INSTRUCTION.sub("", question)


def one_word(question: str) -> str:
    """``question`` asking for one word, as the training data asks it."""
    return f"{without_instruction(question)} {ONE_WORD}"


# A yes/no question opens with an auxiliary verb and asks nothing more after its "?" but the
# evaluation's "Answer with a single word."; a request ("Can you describe ...?") is not one. An
# either/or question offers two words ("Is it a rural or an urban area?").
_AUXILIARY = re.compile(r"^(?:is|are|was|were|isn't|aren't|does|do|did|doesn't|don't|has|have|had|"
                        r"can|could|will|would|should|may|might|must)\b")
_REQUEST = re.compile(r"^(?:can|could|will|would) you (?!see\b|spot\b|tell (?:if|whether)\b)")
_ANSWER_WITH = re.compile(r"^answer with\b[^?]*$")
_CHOICE = re.compile(r"\b(?:an? |the )?([a-z]+)(?: (?:area|one|scene|region|place|image|land))? or "
                     r"(?:an? |the )?([a-z]+)\b")
_NOT_A_CHOICE = {"not", "no", "any", "more", "less", "fewer", "other", "else", "both", "either",
                 "neither", "and", "is", "are"}


def answer_options(question: str) -> list[str] | None:
    """The words ``question`` lets its answer be: ["yes", "no"], the two it offers ("Is the area
    dense or sparse?": ["dense", "sparse"]), or None (an open question, or more than two
    offered). The engine answers with the likelier as the model scores them
    (`rsvlm.engine.ChatSession._chosen`)."""
    q = " ".join(question.lower().split())
    q = re.sub(r"^(?:and|but|so|also|then|ok|okay|well|now)\b,? ", "", q)  # a follow-up's opening
    head, _, rest = q.partition("?")
    if not _AUXILIARY.match(head) or _REQUEST.match(head):
        return None
    if rest.strip() and not _ANSWER_WITH.match(rest.strip()):
        return None
    if not re.search(r"\bor\b(?! not\b)", head):
        return ["yes", "no"]
    found = _CHOICE.search(head)
    if (found is None or "," in head or re.search(r"\bor\b", head[found.end():])
            or {found.group(1), found.group(2)} & _NOT_A_CHOICE
            or found.group(1) == found.group(2)):
        return None
    return [found.group(1), found.group(2)]
