"""Writes support_tickets.jsonl: customer tickets to route to one of four queues.

2,400 tickets, 600 per queue. Like a real support inbox, most tickets carry no label: only 464
(116 per queue) have one, the ones a team would label by hand to measure a model (the held-out
split) and to show the teacher examples (the few-shot pool); the rest have ``"label": null`` and
are the inputs the teacher labels. Tickets are composed from many phrasings, details, openers and
closers, and a third of them mention another queue's topic in passing (the label is what the
customer asks for), so no two tickets are the same text and the task is not a keyword match.

Deterministic (fixed seed), so the shipped file can always be regenerated and checked:
    python configs/data/make_support_tickets.py
"""

import json
import random
from collections.abc import Callable
from pathlib import Path
from string import Formatter

QUEUES = ("payment", "delivery", "bug", "account")
PER_QUEUE = 600
LABELLED_PER_QUEUE = 116  # 464 labelled: a held-out split of 400 and a few-shot pool of 64
SEED = 7

SLOTS = {
    "product": ["headphones", "coffee maker", "laptop stand", "desk lamp", "backpack", "phone case", "keyboard",
                "water bottle", "monitor", "blender", "running shoes", "webcam", "smart watch", "air fryer",
                "office chair", "tablet", "printer", "electric kettle", "speaker", "vacuum cleaner"],
    "gadget": ["headphones", "coffee maker", "smart watch", "tablet", "printer", "speaker", "robot vacuum",
               "webcam", "keyboard", "monitor", "air fryer", "e-reader", "fitness tracker", "baby monitor"],
    "city": ["Lyon", "Denver", "Osaka", "Leeds", "Austin", "Porto", "Dublin", "Perth", "Bergen", "Quebec",
             "Naples", "Tucson"],
    "app": ["the mobile app", "the website", "the desktop app", "the checkout page", "the dashboard",
            "the Android app", "the iPhone app", "the browser extension"],
    "amount": ["$9", "$15", "$29", "$49", "$79", "$120", "$250", "€35", "£60", "$18.99"],
    "day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "the weekend", "yesterday"],
    "n": [str(n) for n in range(2, 10)],
    "order": ["#A1042", "#B2291", "#C3310", "#D4185", "#E5067", "#F6720", "#G7443", "#H8958"],
    "card": ["Visa", "Mastercard", "Amex card", "PayPal account", "debit card", "Apple Pay"],
    "courier": ["the courier", "DHL", "UPS", "FedEx", "the postal service", "the delivery driver"],
    "code": ["500", "403", "E-17", "0x80070005", "404", "TIMEOUT", "502"],
    "device": ["my iPhone", "my Android phone", "my Windows laptop", "my Mac", "my iPad", "a Chromebook"],
}

ASKS = {
    "payment": [
        "I was charged twice for order {order}. Please refund the extra {amount}.",
        "My bank statement shows a charge of {amount} from you that I don't recognise.",
        "Can you send me an invoice for my last payment of {amount}? I need it for my taxes.",
        "I cancelled my subscription but you still billed me {amount} this month.",
        "The discount code was not applied and I paid {amount} instead of the sale price.",
        "Why did my monthly payment go up to {amount}? Nobody told me about a price change.",
        "I returned the {product} {n} weeks ago and the refund still has not reached my {card}.",
        "Please change the card you charge for my plan, the old {card} expired.",
        "My {card} was declined at checkout although it has plenty of funds.",
        "You charged me {amount} for shipping even though the order was over the free shipping limit.",
        "The refund you promised for order {order} shows as pending for {n} days now.",
        "I was billed in the wrong currency, {amount} instead of the price on the page.",
        "Can I split the payment for my {product} into instalments?",
        "I paid for express delivery but was refunded nothing when it came late. I want the {amount} back.",
        "There is a pre-authorisation of {amount} on my {card} that was never released.",
        "Please stop the automatic renewal, I do not want to be charged {amount} again.",
        "The gift card balance was not deducted and my {card} was charged the full {amount}.",
        "How do I get a receipt with my company's VAT number for order {order}?",
    ],
    "delivery": [
        "My {product} was supposed to arrive on {day} but the tracking has not moved.",
        "The parcel with my {product} was delivered to the wrong address in {city}.",
        "How long does delivery to {city} usually take? I ordered a {product} {n} days ago.",
        "The box arrived crushed and the {product} inside is damaged.",
        "Tracking says delivered but there is no package at my door.",
        "Can you ship my {product} to my office in {city} instead of my home?",
        "My order of {n} items arrived with the {product} missing.",
        "{courier} left a note but I was home all {day}. When will they try again?",
        "Order {order} has been stuck in the {city} depot for {n} days.",
        "I received someone else's parcel instead of my {product}.",
        "Can I change the delivery date of order {order}? I will be away on {day}.",
        "{courier} says the address is incomplete, but it is the same one I always use.",
        "The {product} came without the charger and the manual, the box was half empty.",
        "Do you deliver to {city}? The checkout will not accept my postcode.",
        "My parcel was returned to sender without anyone trying to deliver it.",
        "The tracking number for order {order} does not work on {courier}'s site.",
        "Half of my order arrived on {day}, where is the rest?",
        "The {product} was left in the rain outside my building and is soaked.",
    ],
    "bug": [
        "{app} crashes every time I open my order history.",
        "My {gadget} will not turn on after the latest firmware update.",
        "I get error {code} when I try to save my settings on {app}.",
        "The {gadget} disconnects from Bluetooth every few minutes.",
        "{app} is stuck on a loading screen since {day}.",
        "The touch controls on my {gadget} stopped responding.",
        "Notifications from {app} stopped working after I updated {device}.",
        "The {gadget} makes a loud noise and then shuts down.",
        "The search on {app} returns nothing, whatever I type.",
        "{app} logs me out every time I switch screens on {device}.",
        "The {gadget} app does not find the device any more, pairing fails at step {n}.",
        "Pictures on {app} do not load, I only see grey boxes.",
        "The battery of my {gadget} drains in {n} hours since the update.",
        "The 'add to cart' button on {app} does nothing when I tap it.",
        "{app} shows prices in the wrong language and the text overlaps.",
        "My {gadget} keeps restarting by itself every few minutes.",
        "The export to PDF on {app} produces an empty file.",
        "The screen of the {gadget} flickers and goes black after {n} minutes.",
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
        "I lost the phone with my authenticator app and cannot sign in.",
        "Please send me a copy of all the data you hold about me.",
        "How do I add my partner as a second user on the account?",
        "I signed up with the wrong email address, can you correct it?",
        "My account was closed without warning, why?",
        "The verification code you text me never arrives on {device}.",
        "Can I change my username? The one I picked is embarrassing.",
        "I get a message that my email is already registered, but I never made an account.",
        "How do I unsubscribe from your newsletters but keep my account?",
        "Please unlink my old Facebook login from my profile.",
    ],
}

# Mentioned in passing: the ticket's queue is still what the customer asks for.
ASIDES = {
    "payment": ["I paid {amount} for it.", "The payment went through fine.", "I used my {card}."],
    "delivery": ["It arrived on {day}.", "The {product} came quickly.", "{courier} brought it on time."],
    "bug": ["I use {app} on {device}.", "{app} worked fine until recently.", "I updated {app} on {day}."],
    "account": ["I have had an account for {n} years.", "I am logged in on {device}.",
                "My account email is the same as always."],
}
OPENERS = ["", "", "Hi, ", "Hello, ", "Hi team, ", "Urgent: ", "Good morning. ", "Hey, ", "Dear support, ",
           "Quick question: ", "Sorry to bother you, "]
CLOSERS = ["", "", " Thanks.", " Thank you!", " Please help.", " This is frustrating.", " Regards, Sam",
           " Can someone look at this today?", " Thanks in advance, Priya", " Cheers.", " Best, Tom",
           " I have been a customer for years."]


Mentions = list[tuple[str, str]]  # (slot, value) pairs, as filled into a ticket


def fill(template: str, rng: random.Random) -> tuple[str, Mentions]:
    """The template filled, and the (slot, value) pairs it mentions."""
    values = {name: rng.choice(choices) for name, choices in SLOTS.items()}
    return template.format(**values), [(name, values[name]) for _, name, _, _ in Formatter().parse(template) if name]


def make_text(rng: random.Random, queue: str) -> tuple[str, Mentions]:
    """A ticket asking for ``queue``, and every (slot, value) it mentions, the aside's included."""
    ask, mentions = fill(rng.choice(ASKS[queue]), rng)
    if rng.random() < 1 / 3:
        aside, aside_mentions = fill(rng.choice(ASIDES[rng.choice([q for q in QUEUES if q != queue])]), rng)
        mentions += aside_mentions
        aside = aside[0].upper() + aside[1:]
        ask = f"{aside} {ask}" if rng.random() < 0.5 else f"{ask} {aside}"
    opener = rng.choice(OPENERS)
    if opener and not ask.startswith(("I ", "I'")):
        ask = ask[0].lower() + ask[1:]
    text = (opener + ask + rng.choice(CLOSERS)).strip()
    if rng.random() < 0.1:  # typed in a hurry
        text = text.lower().rstrip(".!")
    return (text[0].upper() + text[1:] if text[0].isalpha() and rng.random() >= 0.1 else text), mentions


def normalized(text: str) -> str:
    """As distilflow compares inputs for duplicates: case and runs of whitespace ignored."""
    return " ".join(text.split()).casefold()


def make_tickets(seed: int = SEED, accept: Callable[[Mentions], bool] = lambda mentions: True) -> list[dict]:
    """Every ticket with its queue and the slots it mentions (the truth, labelled or not), in file order;
    ``accept`` may refuse a ticket by its mentions (another one is drawn)."""
    rng = random.Random(seed)
    tickets, seen = [], set()
    for queue in QUEUES:
        made = 0
        while made < PER_QUEUE:
            text, mentions = make_text(rng, queue)
            if accept(mentions) and normalized(text) not in seen:
                seen.add(normalized(text))
                tickets.append({"text": text, "queue": queue, "mentions": mentions})
                made += 1
    rng.shuffle(tickets)
    labelled = {i for queue in QUEUES
                for i in rng.sample([i for i, t in enumerate(tickets) if t["queue"] == queue], LABELLED_PER_QUEUE)}
    return [{"id": i, **t, "labelled": i in labelled} for i, t in enumerate(tickets)]


def published(ticket: dict) -> dict:
    """The ticket as the data file holds it: a label only where a person labelled it."""
    return {"id": ticket["id"], "text": ticket["text"], "label": ticket["queue"] if ticket["labelled"] else None}


if __name__ == "__main__":
    out = Path(__file__).with_name("support_tickets.jsonl")
    out.write_text("".join(json.dumps(published(t)) + "\n" for t in make_tickets()))
    print(f"wrote {out}")
