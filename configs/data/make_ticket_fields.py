"""Writes ticket_fields.jsonl: the support tickets of make_support_tickets.py, to read as a JSON object.

From each ticket, the fields a support system files it under: its queue, and the order id, amount,
currency and product it mentions, null where it mentions none. The generator filled every slot, so
it knows each field's value; a value is given as the ticket writes it (a ticket typed in a hurry
writes ``#g7443``), the amount as a number and its currency as an ISO 4217 code. A ticket that
mentions two different values of one field (an aside about another product) is not drawn.

Labelled like support_tickets.jsonl: 2,400 tickets, the label (the object) only on 464 of them, a
held-out split of 400 and a few-shot pool of 64; the rest have ``"label": null`` for the teacher.

Deterministic (fixed seed), so the shipped file can always be regenerated and checked:
    python configs/data/make_ticket_fields.py
"""

import json
from pathlib import Path

from make_support_tickets import SEED, Mentions, make_tickets

FIELDS = ("queue", "order_id", "amount", "currency", "product")
CURRENCIES = {"$": "USD", "€": "EUR", "£": "GBP"}
FIELD_OF_SLOT = {"order": "order_id", "amount": "amount", "product": "product", "gadget": "product"}

# The answer's form (task.check.json_schema of configs/extract.yaml): every field present, null where not mentioned.
SCHEMA = {
    "type": "object",
    "properties": {
        "queue": {"enum": ["payment", "delivery", "bug", "account"]},
        "order_id": {"type": ["string", "null"]},
        "amount": {"type": ["number", "null"]},
        "currency": {"enum": [*CURRENCIES.values(), None]},
        "product": {"type": ["string", "null"]},
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}


def one_value_per_field(mentions: Mentions) -> bool:
    """The ticket names at most one order id, amount and product: its fields have one right answer."""
    values = {}
    for slot, value in mentions:
        if slot in FIELD_OF_SLOT and values.setdefault(FIELD_OF_SLOT[slot], value) != value:
            return False
    return True


def fields(ticket: dict) -> dict:
    """The object to extract from ``ticket``, every field in ``FIELDS`` order, values as the text writes them."""
    text, found = ticket["text"], {"queue": ticket["queue"]}
    for slot, value in ticket["mentions"]:
        if slot in FIELD_OF_SLOT:
            start = text.casefold().index(value.casefold())
            found[FIELD_OF_SLOT[slot]] = text[start:start + len(value)]
    if "amount" in found:
        symbol, number = found["amount"][0], float(found["amount"][1:])
        found["amount"], found["currency"] = int(number) if number.is_integer() else number, CURRENCIES[symbol]
    return {name: found.get(name) for name in FIELDS}


def published(ticket: dict) -> dict:
    """The ticket as the data file holds it: a label only where a person labelled it."""
    return {"id": ticket["id"], "text": ticket["text"], "label": fields(ticket) if ticket["labelled"] else None}


if __name__ == "__main__":
    out = Path(__file__).with_name("ticket_fields.jsonl")
    out.write_text("".join(json.dumps(published(t)) + "\n" for t in make_tickets(SEED, one_value_per_field)))
    print(f"wrote {out}")
