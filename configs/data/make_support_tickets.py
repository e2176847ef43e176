"""Writes support_tickets.jsonl: short customer tickets labelled with one of four queues.

Deterministic (fixed seed), so the shipped file can always be regenerated and checked:
    python configs/data/make_support_tickets.py
"""

import json
import random
from pathlib import Path

PRODUCTS = ["headphones", "coffee maker", "laptop stand", "desk lamp", "backpack", "phone case",
            "keyboard", "water bottle", "monitor", "blender", "running shoes", "webcam"]
CITIES = ["Lyon", "Denver", "Osaka", "Leeds", "Austin", "Porto", "Dublin", "Perth"]
APPS = ["the mobile app", "the website", "the desktop app", "the checkout page", "the dashboard"]

TEMPLATES = {
    "payment": [
        "I was charged twice for my {product} order. Please refund the extra ${amount}.",
        "My credit card statement shows a charge of ${amount} that I don't recognise.",
        "Can I get an invoice for my last payment of ${amount}? I need it for my taxes.",
        "I cancelled my subscription but you still billed me ${amount} this month.",
        "The discount code was not applied and I paid ${amount} instead of the sale price.",
        "Why did my monthly payment go up to ${amount}? Nobody told me about a price change.",
        "I returned the {product} three weeks ago and still have not received my refund.",
        "Please update the credit card you charge for my plan, the old one expired.",
    ],
    "delivery": [
        "My {product} was supposed to arrive on {day} but the tracking has not moved.",
        "The parcel with my {product} was delivered to the wrong address in {city}.",
        "How long does delivery to {city} usually take? I ordered a {product} {n} days ago.",
        "The box arrived crushed and the {product} inside is damaged.",
        "Tracking says delivered but there is no package at my door.",
        "Can you ship my {product} to my office in {city} instead of my home?",
        "My order of {n} items arrived with the {product} missing.",
        "The courier left a note but I was home all {day}. When will they try again?",
    ],
    "bug": [
        "{app} crashes every time I open my order history.",
        "My {product} will not turn on after the latest firmware update.",
        "I get an error 500 when I try to save my settings on {app}.",
        "The {product} disconnects from Bluetooth every few minutes.",
        "{app} is stuck on a loading screen since {day}.",
        "The touch controls on my {product} stopped responding.",
        "Notifications from {app} stopped working after I updated my phone.",
        "The {product} makes a loud noise and then shuts down.",
    ],
    "account": [
        "I forgot my password and the reset email never arrives.",
        "How do I change the email address on my account?",
        "Please delete my account and all my personal data.",
        "Someone logged into my account from {city}. I think I was hacked.",
        "I can't log in, it says my account is locked after {n} attempts.",
        "I want to merge my two accounts into one.",
        "How do I turn on two-factor authentication for my profile?",
        "My username shows the wrong name, how can I update my profile?",
    ],
}
OPENERS = ["", "Hi, ", "Hello, ", "Hi team, ", "Urgent: ", "Good morning. "]
CLOSERS = ["", " Thanks.", " Thank you!", " Please help.", " This is frustrating.", " Regards, Sam"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the weekend"]


def make_ticket(rng: random.Random, label: str) -> dict:
    body = rng.choice(TEMPLATES[label]).format(
        product=rng.choice(PRODUCTS), city=rng.choice(CITIES), app=rng.choice(APPS),
        amount=rng.choice([9, 15, 29, 49, 79, 120, 250]), day=rng.choice(DAYS), n=rng.randint(2, 9))
    opener = rng.choice(OPENERS)
    if opener:
        body = body[0].lower() + body[1:] if not body.startswith(("I ", "I'")) else body
    text = (opener + body + rng.choice(CLOSERS)).strip()
    return {"text": text[0].upper() + text[1:], "label": label}


def make_tickets(per_label: int = 120, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    tickets, seen = [], set()
    for label in TEMPLATES:
        while sum(t["label"] == label for t in tickets) < per_label:
            ticket = make_ticket(rng, label)
            if ticket["text"] not in seen:
                seen.add(ticket["text"])
                tickets.append(ticket)
    rng.shuffle(tickets)
    return [{"id": i, **ticket} for i, ticket in enumerate(tickets)]


if __name__ == "__main__":
    out = Path(__file__).with_name("support_tickets.jsonl")
    out.write_text("".join(json.dumps(t) + "\n" for t in make_tickets()))
    print(f"wrote {out}")
