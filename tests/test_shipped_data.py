"""The shipped task data: each file is what its generator writes (fixed seed), and its labels are right."""

import json

import pytest

from distilflow.configs.loader import load_config
from distilflow.tasks import checks
from tests.conftest import REPO

DATA = REPO / "configs" / "data"


@pytest.fixture
def generators(monkeypatch):
    """configs/data's generators, importable as the scripts import each other (from their own directory)."""
    monkeypatch.syspath_prepend(str(DATA))
    import make_support_tickets
    import make_ticket_fields

    return make_support_tickets, make_ticket_fields


def written(publish, tickets) -> str:
    return "".join(json.dumps(publish(t)) + "\n" for t in tickets)


def test_support_tickets_jsonl_is_what_its_generator_writes(generators):
    tickets, _ = generators
    assert written(tickets.published, tickets.make_tickets()) == (DATA / "support_tickets.jsonl").read_text()


def test_ticket_fields_jsonl_is_what_its_generator_writes(generators):
    tickets, fields = generators
    assert written(fields.published, tickets.make_tickets(tickets.SEED, fields.one_value_per_field)) \
        == (DATA / "ticket_fields.jsonl").read_text()


def test_ticket_fields_are_labelled_only_on_the_held_out_split_and_the_pool():
    rows = [json.loads(line) for line in (DATA / "ticket_fields.jsonl").read_text().splitlines()]
    assert (len(rows), sum(row["label"] is not None for row in rows)) == (2400, 464)


def test_extract_yaml_checks_answers_by_the_generators_schema(generators):
    _, fields = generators
    assert load_config(REPO / "configs" / "extract.yaml").task.check.json_schema == fields.SCHEMA


def test_every_ticket_fields_label_passes_extract_yaml_check():
    task = load_config(REPO / "configs" / "extract.yaml").task
    rows = [json.loads(line) for line in (DATA / "ticket_fields.jsonl").read_text().splitlines()]
    assert all(checks.is_valid(checks.label(row, task), task) for row in rows if row["label"] is not None)


def test_a_ticket_fields_label_copies_values_as_the_ticket_writes_them(generators):
    _, fields = generators
    ticket = {"text": "urgent: i was charged twice for order #g7443. please refund the extra £18.99",
              "queue": "payment", "mentions": [("order", "#G7443"), ("amount", "£18.99")]}
    assert fields.fields(ticket) == {"queue": "payment", "order_id": "#g7443", "amount": 18.99, "currency": "GBP",
                                     "product": None}


def test_a_ticket_naming_two_products_is_not_drawn(generators):
    _, fields = generators
    assert fields.one_value_per_field([("product", "kettle"), ("product", "kettle"), ("amount", "$9")])
    assert not fields.one_value_per_field([("product", "kettle"), ("gadget", "tablet")])
