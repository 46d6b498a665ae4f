"""Build ``hf_decoding_ext/data/prompts/distill.jsonl``: the self-distillation prompt set for training draft heads.

Trained speculative-decoding drafters (Medusa heads, EAGLE, ...) are trained on the responses the base model
(SmolLM2-135M-Instruct) generates for these prompts. The set mirrors the six categories of the benchmark prompt set
(``benchmark.jsonl``) so that the drafters see the same kinds of requests, but it shares no prompt with it:

* ``qa`` and ``multi_turn_chat``: templates x topic lists written in this script (explanations, definitions,
  comparisons, how-tos, advice, lists, short poems / stories / emails; chats with one or two earlier exchanges);
* ``translation``: short English passages written in this script, into French, Spanish, German or Italian;
* ``math_reasoning``: arithmetic word-problem templates filled with random numbers (the answer is computed and stored
  in ``answer``, as in the benchmark);
* ``summarization`` and ``rag_qa``: docstrings extracted *at build time* from the running CPython's standard library
  (``inspect``), 300 to 1500 characters long, excluding every object used in ``hf_decoding_ext/data/stdlib_docs.jsonl``
  (the benchmark's document pool), the members of the classes used there, the same objects under other names, and any
  text equal to (or containing, or contained in) one of its texts. The two categories use disjoint docstrings.

Output rows have the benchmark's format: ``{"id": "distill-qa-0001", "category": "qa", "prompt": ..., "source": ...}``
(plus ``answer`` for ``math_reasoning``). ``source`` is ``template:<category>/<template family>`` for the written
templates and ``python-stdlib:<object>`` for docstrings.

The build is deterministic (fixed seeds) for a given Python version: the docstrings come from the interpreter that
runs it, so rebuild with the version recorded in ``data/prompts/SOURCES.md`` (CPython 3.11.7) to reproduce the
committed file byte for byte.

Usage:
    python scripts/build_distill_prompts.py            # writes hf_decoding_ext/data/prompts/distill.jsonl
    python scripts/build_distill_prompts.py --out /tmp/distill.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import platform
import random
import re
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "hf_decoding_ext" / "data"
BENCHMARK = DATA / "prompts" / "benchmark.jsonl"
STDLIB_DOCS = DATA / "stdlib_docs.jsonl"
DEFAULT_OUT = DATA / "prompts" / "distill.jsonl"

SEED = 20250611
PER_CATEGORY = 200
REFERENCE_PYTHON = "3.11.7"  # the interpreter the committed distill.jsonl was built with
CATEGORIES = ("multi_turn_chat", "translation", "summarization", "qa", "math_reasoning", "rag_qa")
DOC_MIN_CHARS, DOC_MAX_CHARS = 300, 1500


def _norm(s: str) -> str:
    return " ".join(str(s).split())


# =============================================================================================================== qa
QA_CONCEPTS = [
    "plate tectonics", "black holes", "natural selection", "supply and demand", "opportunity cost",
    "the placebo effect", "machine learning", "public-key encryption", "nuclear fusion", "antibiotic resistance",
    "the Doppler effect", "entropy", "the printing press", "the Industrial Revolution", "the Renaissance",
    "democracy in ancient Athens", "the Silk Road", "volcanoes", "the nitrogen cycle", "osmosis",
    "the speed of light", "electric circuits", "magnetism", "cloud computing", "open-source software",
    "the stock market", "central bank interest rates", "recycling", "solar panels", "wind turbines",
    "the human heart", "the nervous system", "metabolism", "the phases of the Moon", "solar eclipses",
    "the Big Bang theory", "tsunamis", "the ozone layer", "coral reefs", "bird migration", "hibernation",
    "fermentation", "the scientific method", "the Pythagorean theorem", "prime numbers", "probability",
    "sampling bias", "compilers", "operating systems", "version control", "the Great Wall of China",
    "the Olympic Games", "the Cold War", "the Magna Carta",
]
QA_CONCEPT_TEMPLATES = [
    "Explain {x} in simple terms.",
    "What is meant by {x}? Keep the answer short.",
    "What is the significance of {x}? Give two reasons.",
    "Give me three interesting facts about {x}.",
    "Explain {x} to a high-school student in one paragraph.",
    "What are the most common misconceptions about {x}?",
    "Write a short paragraph that introduces {x} to a complete beginner.",
]
QA_PAIRS = [
    ("a crocodile", "an alligator"), ("a simile", "a metaphor"), ("mitosis", "meiosis"),
    ("a debit card", "a credit card"), ("renting a home", "buying a home"), ("a democracy", "a monarchy"),
    ("speed", "velocity"), ("a stock", "a bond"), ("a frog", "a toad"), ("a violin", "a viola"),
    ("baking soda", "baking powder"), ("a hurricane", "a tornado"), ("alternating current", "direct current"),
    ("Python", "JavaScript"), ("a compiler", "an interpreter"), ("TCP", "UDP"), ("latitude", "longitude"),
    ("empathy", "sympathy"), ("a psychologist", "a psychiatrist"), ("nuclear fission", "nuclear fusion"),
    ("a star", "a planet"), ("a cold", "the flu"), ("arteries", "veins"), ("an e-book", "a printed book"),
    ("Stoicism", "Epicureanism"), ("butter", "margarine"), ("aerobic exercise", "anaerobic exercise"),
    ("a CV", "a cover letter"), ("a glacier", "an iceberg"), ("a lake", "a sea"),
]
QA_COMPARE_TEMPLATES = [
    "What is the difference between {a} and {b}?",
    "Compare {a} and {b}. How are they alike and how do they differ?",
    "Explain briefly how {a} differs from {b}.",
]
QA_HOWTO = [
    "make pour-over coffee", "fix a flat bicycle tyre", "start a compost bin", "prepare for a job interview",
    "write a good cover letter", "back up the photos on my phone", "learn to touch type", "look after a cactus",
    "clean a cast-iron pan", "make a simple monthly budget", "tie a bowline knot", "secure my home Wi-Fi network",
    "bake bread without a bread machine", "plan a week of healthy lunches", "remove a red wine stain from a carpet",
    "teach a puppy to sit", "improve my handwriting", "start keeping a journal",
    "fold a paper airplane that flies far", "choose a strong password", "prepare for a long-distance hike",
    "teach a child to ride a bike", "organise a small wardrobe", "reduce food waste at home",
    "brew green tea properly", "give constructive feedback to a colleague", "read a nutrition label",
    "practise mindful breathing", "pack a suitcase efficiently", "change a light switch safely",
]
QA_HOWTO_TEMPLATES = [
    "How do I {x}?",
    "Give me step-by-step instructions to {x}.",
    "What is the easiest way to {x}?",
]
QA_ADVICE = [
    "I have trouble falling asleep before exams.", "I just moved to a new city and don't know anyone.",
    "I want to read more books but never find the time.", "My team at work keeps missing deadlines.",
    "I'm nervous about my first day at a new job.", "I spend too much money on takeaway food.",
    "I want to get back into exercise after a long break.", "My teenage son spends every evening on his phone.",
    "I always put off big assignments until the last night.", "I want to learn a new language as an adult.",
    "I get distracted easily when I work from home.", "My houseplants keep dying.",
    "I have to give a toast at my sister's wedding.", "I want my small flat to feel bigger.",
    "I forget people's names right after meeting them.", "I'm thinking about changing careers at forty.",
    "My neighbour plays loud music late at night.", "I want to start investing but know very little about it.",
    "I feel overwhelmed by my email inbox.", "I want to eat less sugar.", "My old dog has become less active.",
    "I'm planning my first solo trip abroad.", "I'd like to volunteer but don't know where to start.",
    "I have a long flight next week and I hate flying.", "I want to speak up more confidently in meetings.",
]
QA_ADVICE_TEMPLATES = [
    "{x} What would you advise?",
    "{x} Can you give me some practical tips?",
    "{x} What should I do?",
]
QA_LISTS = [
    "five ways to save energy at home", "five classic novels worth reading", "three famous bridges",
    "five tips for taking better photos with a phone", "four healthy breakfast ideas",
    "five common logical fallacies", "three inventions of the 20th century that changed daily life",
    "five questions to ask at the end of a job interview", "three board games for two players",
    "five houseplants that need little light", "five important skills for a software engineer",
    "four ways to stay warm without turning up the heating", "five habits of good listeners",
    "five things to check before buying a used car", "five rainy-day activities for children",
    "four signs that a website might be a scam", "five simple vegetarian dinners", "three major rivers in Africa",
    "five things to pack for a beach holiday", "five ways to use less plastic", "five famous paintings",
    "three benefits of learning a musical instrument", "five tips for writing clear emails",
    "four ways to make a long car journey more fun", "five foods that are rich in iron",
]
QA_LIST_TEMPLATES = [
    "List {x}.",
    "Give me {x}, with one sentence on each.",
    "Can you suggest {x}? Keep each point brief.",
]
QA_WORDS = [
    "serendipity", "ubiquitous", "ephemeral", "pragmatic", "resilience", "algorithm", "bandwidth", "irony",
    "gentrification", "procrastination", "nostalgia", "hypothesis", "cognitive dissonance", "mortgage", "catalyst",
    "biodegradable", "paradox", "ecosystem", "sustainability", "hierarchy", "quorum", "latency", "allegory",
    "equilibrium", "dividend", "meticulous", "ambiguous", "benevolent", "candid", "frugal",
]
QA_WORD_TEMPLATES = [
    "Define '{x}' and use it in an example sentence.",
    "What does the word '{x}' mean?",
    "Explain the meaning of '{x}' to someone who is learning English.",
]
QA_POEMS = [
    "a rainy Monday morning", "a cat watching birds from a window", "the sound of the sea", "a city at night",
    "the first day of spring", "a forgotten umbrella", "a cup of hot chocolate", "friendship", "a mountain sunrise",
    "a library at closing time", "a kite on a windy day", "the last day of the summer holidays",
    "a busy train station", "the stars over a desert", "a grandmother's kitchen", "a snail crossing a garden path",
    "the moon over a quiet lake", "a lost glove", "an old wooden bridge", "a thunderstorm in July",
]
QA_POEM_TEMPLATES = [
    "Write a short poem about {x}.",
    "Write a haiku about {x}.",
    "Write a four-line rhyming poem about {x}.",
]
QA_STORIES = [
    "a robot that learns to paint", "a girl who finds a map in her grandfather's attic",
    "a baker whose bread makes people sing", "two rival chess players stuck in a snowstorm",
    "a dog that gets lost at a summer fair", "a time traveller who can only go back ten minutes",
    "a shy dragon who wants to open a tea shop", "an astronaut who hears music on the Moon",
    "a boy who swaps places with his cat for a day", "a village where it has never rained",
    "a detective who is afraid of the dark", "a postman who delivers letters to the wrong century",
    "a tree that remembers everyone who sat under it", "a museum statue that comes alive at night",
    "a grandmother who wins a skateboarding contest", "a penguin who wants to see a desert",
    "a lost key that opens every door but one", "a choir of frogs preparing for a concert",
    "a girl who can talk to clouds", "an inventor whose machines only work on Tuesdays",
]
QA_STORY_TEMPLATES = [
    "Write a short story about {x}.",
    "Write a very short story (under 150 words) about {x}.",
    "Tell me a bedtime story about {x}.",
]
QA_EMAILS = [
    "my manager asking for a day off next Friday", "a customer apologising for a late delivery",
    "my neighbours inviting them to a garden party", "my professor asking for an extension on an essay",
    "a hotel asking whether pets are allowed", "a colleague thanking her for help with a project",
    "a client to move Tuesday's meeting to Thursday", "my son's school about the bus always being late",
    "a plumber asking for a quote to repair a shower", "an old friend I haven't spoken to in a year",
    "a supplier about an invoice that never arrived", "my team announcing a new weekly meeting",
    "a restaurant to compliment their service", "my gym to cancel my membership",
    "the organisers of a conference asking about vegetarian meals", "a new employee welcoming him to the team",
    "the library asking to renew a book", "a local charity offering to help on weekends",
    "an airline about a suitcase that did not arrive", "my landlady asking if I can paint the bedroom",
]
QA_EMAIL_TEMPLATES = [
    "Write a short email to {x}.",
    "Draft a polite email to {x}.",
    "Write a friendly, brief email to {x}.",
]
# family name -> (items, templates, number of prompts to draw); the counts add up to PER_CATEGORY
QA_FAMILIES = {
    "concept": (QA_CONCEPTS, QA_CONCEPT_TEMPLATES, 40),
    "compare": (QA_PAIRS, QA_COMPARE_TEMPLATES, 20),
    "howto": (QA_HOWTO, QA_HOWTO_TEMPLATES, 22),
    "advice": (QA_ADVICE, QA_ADVICE_TEMPLATES, 22),
    "list": (QA_LISTS, QA_LIST_TEMPLATES, 20),
    "definition": (QA_WORDS, QA_WORD_TEMPLATES, 20),
    "poem": (QA_POEMS, QA_POEM_TEMPLATES, 18),
    "story": (QA_STORIES, QA_STORY_TEMPLATES, 18),
    "email": (QA_EMAILS, QA_EMAIL_TEMPLATES, 20),
}


def build_qa(rng: random.Random) -> list[dict]:
    rows = []
    for family, (items, templates, n) in QA_FAMILIES.items():
        combos = [(i, t) for i in range(len(items)) for t in range(len(templates))]
        rng.shuffle(combos)
        # spread over the items first: take each item once before taking any item twice
        used, picked = Counter(), []
        for rnd in range(len(templates)):
            for i, t in combos:
                if len(picked) < n and used[i] == rnd and (i, t) not in picked:
                    picked.append((i, t))
                    used[i] += 1
        for i, t in picked:
            item = items[i]
            text = (templates[t].format(a=item[0], b=item[1]) if isinstance(item, tuple)
                    else templates[t].format(x=item))
            rows.append({"prompt": text[0].upper() + text[1:], "source": f"template:qa/{family}"})
    return rows


# ================================================================================================== multi_turn_chat
CHAT_EXPLAIN = [
    ("What is a black hole?",
     "A black hole is a region of space where gravity is so strong that nothing, not even light, can escape once it "
     "crosses the event horizon."),
    ("How do noise-cancelling headphones work?",
     "They use small microphones to pick up outside sound and play an inverted copy of it, so the two sound waves "
     "cancel each other out."),
    ("What does a central bank do?",
     "A central bank manages a country's money supply, sets key interest rates and lends to commercial banks when "
     "they run short of money."),
    ("Why do onions make you cry?",
     "Cutting an onion releases an irritating gas that reaches your eyes, and your eyes produce tears to wash it "
     "away."),
    ("What is an API?",
     "An API, or application programming interface, is a set of rules that lets one program request data or "
     "services from another."),
    ("How do bats find their way in the dark?",
     "Most bats use echolocation: they make high-pitched calls and listen to the echoes that bounce back from "
     "objects around them."),
    ("What does the Pythagorean theorem say?",
     "In a right-angled triangle, the square of the longest side equals the sum of the squares of the other two "
     "sides: a² + b² = c²."),
    ("What causes earthquakes?",
     "Most earthquakes happen when stress builds up along faults between tectonic plates and is suddenly released "
     "as the rocks slip."),
    ("What is a recession?",
     "A recession is a significant decline in economic activity that lasts for months, usually visible in falling "
     "output, income and employment."),
    ("How does a microwave oven heat food?",
     "It produces microwaves that make the water molecules in food vibrate rapidly, and that motion turns into "
     "heat."),
    ("What was the Silk Road?",
     "The Silk Road was a network of trade routes linking China with Central Asia, the Middle East and Europe, used "
     "for well over a thousand years."),
    ("What is machine learning?",
     "Machine learning is a way of building computer programs that learn patterns from examples instead of "
     "following hand-written rules."),
    ("Why do leaves change colour before they fall?",
     "As the days get shorter, trees stop making green chlorophyll, which reveals the yellow and orange pigments "
     "that were in the leaves all along."),
    ("What is a sonnet?",
     "A sonnet is a fourteen-line poem with a fixed rhyme scheme, traditionally written in iambic pentameter."),
    ("How does a credit score work?",
     "A credit score is a number calculated from your borrowing history, for example whether you pay bills on time "
     "and how much debt you carry."),
    ("What is the difference between a lake and a pond?",
     "There is no strict rule, but lakes are usually larger and deeper, so sunlight does not reach the bottom "
     "everywhere as it does in a pond."),
    ("What does a firewall do?",
     "A firewall monitors network traffic and blocks connections that do not match a set of security rules."),
    ("Why is the Dead Sea so salty?",
     "Rivers flow into the Dead Sea but nothing flows out, so water only leaves by evaporation and the salt stays "
     "behind."),
    ("What is regenerative braking in an electric car?",
     "It uses the electric motor as a generator when the car slows down, turning the car's motion back into energy "
     "stored in the battery."),
    ("What was the Renaissance?",
     "The Renaissance was a period of European cultural revival, roughly from the 14th to the 17th century, known "
     "for new art, science and a renewed interest in classical learning."),
    ("How does a bicycle stay upright?",
     "Mostly through steering: when a moving bike starts to lean, the rider and the front wheel steer it back under "
     "the centre of mass."),
    ("What is a prime number?",
     "A prime number is a whole number greater than 1 that can only be divided evenly by 1 and by itself, like 2, 3, "
     "5, 7 and 11."),
    ("What are the parts of a web address?",
     "A URL usually has a scheme such as https, a domain name, an optional path, and sometimes query parameters "
     "after a question mark."),
    ("Why do we get goosebumps?",
     "Tiny muscles at the base of each hair contract when you are cold or emotional, making the hairs stand up and "
     "the skin bump."),
    ("What is the Doppler effect?",
     "It is the change in pitch or frequency of a wave when its source moves towards or away from you, like a siren "
     "that drops in pitch as it passes."),
]
CHAT_ADVICE = [
    ("I want to start learning to draw. Where should I begin?",
     "Start with simple shapes and everyday objects, and draw for fifteen minutes a day rather than for hours once "
     "a week."),
    ("How can I make my mornings less rushed?",
     "Prepare the night before: lay out your clothes, pack your bag and decide on breakfast, so you make fewer "
     "decisions in the morning."),
    ("I want to drink more water during the day. Any tips?",
     "Keep a refillable bottle on your desk, drink a glass with every meal, and set a few reminders on your phone."),
    ("What is a good way to study for a history exam?",
     "Make a timeline of the key events, explain each one out loud in your own words, and test yourself with "
     "practice questions."),
    ("How do I keep my bike from getting stolen?",
     "Use a sturdy D-lock through the frame and the back wheel, lock it to something fixed, and park in busy, "
     "well-lit places."),
    ("I want to cook at home more instead of ordering food.",
     "Begin with three or four easy recipes you enjoy, shop with a list once a week, and cook larger batches so you "
     "have leftovers."),
    ("How can I get better at saving money?",
     "Track your spending for a month, set a realistic savings goal, and move that amount to a separate account on "
     "payday."),
    ("My cat scratches the sofa. What can I do?",
     "Give her a tall, sturdy scratching post next to the sofa, reward her when she uses it, and cover the sofa's "
     "corners for a while."),
    ("How can I sleep better at night?",
     "Keep a regular bedtime, avoid screens for an hour before bed, and keep your bedroom cool, dark and quiet."),
    ("I'm training for my first marathon, which is in six months.",
     "Build up your weekly distance gradually, include one long run each week, and plan easy days so your body can "
     "recover."),
    ("How should I prepare for a video job interview?",
     "Test your camera and microphone in advance, choose a quiet spot with good light, and prepare short stories "
     "about your past work."),
    ("I want to grow tomatoes in my garden this year.",
     "Plant them in a sunny spot after the last frost, water deeply at the base, and give them stakes or cages for "
     "support."),
    ("How do I make friends after moving to a new town?",
     "Join a club or class that meets regularly, say yes to invitations, and suggest a coffee to people you get on "
     "with."),
    ("My phone battery drains very quickly. What should I look at?",
     "Check which apps use the most battery in the settings, lower the screen brightness, and turn off background "
     "refresh for apps you rarely use."),
    ("I want to become a better public speaker.",
     "Practise in front of a friend or a camera, slow down, and focus on one clear message instead of many "
     "details."),
    ("How can I keep my kitchen tidy?",
     "Clean as you cook, wipe the surfaces right after meals, and give every item a fixed place so it is easy to put "
     "away."),
    ("I have a job offer, but the salary is lower than I hoped.",
     "You can politely ask for more: mention your skills and the usual pay for the role, and make clear that you "
     "are excited about the job."),
    ("How can I stop procrastinating on my thesis?",
     "Break it into small tasks, work in short focused blocks with a timer, and agree deadlines with a friend who "
     "checks on you."),
    ("What should I think about before adopting a dog?",
     "Think about how much time, space and money you have, and choose a dog whose energy level fits your daily "
     "routine."),
    ("How do I cut down my screen time in the evening?",
     "Pick a fixed time when your phone goes on the charger in another room, and replace scrolling with a book, a "
     "walk or a hobby."),
]
CHAT_CREATIVE = [
    ("Write a two-line poem about coffee.",
     "Dark and warm, my morning cup,\nthe only thing that wakes me up."),
    ("Give me a name for a small bakery in a seaside town.",
     "How about \"The Salty Crust\"? It hints at the sea and at fresh bread."),
    ("Write a limerick about a cat.",
     "There once was a cat named Lou\nwho slept in a size-seven shoe.\nWhen the owner came round\nthere was hissing, "
     "a sound,\nand a shoe that was now a cat's too."),
    ("Suggest a title for a mystery novel set on a night train.",
     "\"The Last Stop Before Midnight\"."),
    ("Write an opening sentence for a fantasy story.",
     "The dragon had slept under the village for three hundred years, and this morning it began to snore."),
    ("Write a slogan for a bicycle repair shop.",
     "\"We fix it, you ride it.\""),
    ("Write a haiku about the ocean.",
     "Waves fold into foam,\nthe tide drags the pebbles back,\ngulls argue above."),
    ("Invent a new ice cream flavour.",
     "Honey-lavender crunch: lavender cream with swirls of honey and pieces of caramelised almond."),
    ("Write a riddle for children.",
     "I have hands but cannot clap, and a face but cannot smile. What am I? (A clock.)"),
    ("Describe a sunset in one sentence.",
     "The sun slid behind the hills and left the sky glowing orange, pink and a soft, fading gold."),
    ("Write a short toast for my friend Anna's birthday.",
     "To Anna: may the year ahead bring you as much laughter as you bring to all of us. Cheers!"),
    ("Come up with a name for a robot that helps in the kitchen.",
     "How about \"Sir Stirs-a-Lot\", a cheerful robot that whisks, chops and stirs?"),
    ("Write the first line of a love letter.",
     "Since the day we met at the station, every train I hear reminds me of you."),
    ("Write a four-line poem about rain.",
     "Rain taps softly on the glass,\npuddles gather in the grass,\numbrellas bloom in every street,\nand little "
     "rivers chase our feet."),
    ("Give me an idea for a children's picture book.",
     "A shy little cloud who is afraid of raining learns that the flowers below are waiting for her."),
]
CHAT_FOLLOWUPS = {
    "explain": [
        "Can you give me a concrete example?", "Could you explain that in simpler words?",
        "How would you explain that to a child?", "Is there a common misconception about this?",
        "Can you go into a bit more detail?", "Can you sum that up in one sentence?",
        "What is an interesting fact related to this?", "Can you give me an analogy for that?",
        "Interesting! Can you write three quiz questions about it?", "Why is that useful to know?",
        "Thanks, that's helpful. Where could I read more about it?",
    ],
    "advice": [
        "What should I do first?", "What are the most common mistakes people make with this?",
        "Which of those points matters most?", "And if that doesn't work for me?",
        "Can you turn that into a simple plan for the next week?", "Can you explain why that works?",
        "Can you give me three more tips?", "Is there anything I should avoid?",
        "Thanks. Can you put that as a short checklist?",
    ],
    "creative": [
        "Nice! Can you make it funnier?", "Can you give me two more options?", "Could you make it a little longer?",
        "Can you make it sound more serious?", "Why did you choose that?",
        "Can you rewrite it so that a five-year-old would enjoy it?", "Great. Now one in a sad tone, please.",
    ],
}
CHAT_SWITCHES = ["Thanks! Another question: ", "Got it. Different topic: ", "OK, thanks. ", "Thank you. Now, ",
                 "Makes sense. One more thing: "]
CHAT_MIX = {"followup": 120, "switch": 40, "two_exchanges": 40}


def _join(prefix: str, request: str) -> str:
    """``prefix + request``, lower-casing the request's first letter after a comma ("Thank you. Now, what ...")."""
    if prefix.endswith(", ") and not (request.startswith("I ") or request.startswith("I'")):
        request = request[0].lower() + request[1:]
    return prefix + request


def build_chat(rng: random.Random) -> list[dict]:
    pairs = ([("explain", q, a) for q, a in CHAT_EXPLAIN] + [("advice", q, a) for q, a in CHAT_ADVICE]
             + [("creative", q, a) for q, a in CHAT_CREATIVE])
    seen, rows = set(), []

    def add(msgs, family):
        key = json.dumps(msgs)
        if key in seen:
            return False
        seen.add(key)
        rows.append({"prompt": msgs, "source": f"template:multi_turn_chat/{family}"})
        return True

    def turns(*pairs_and_last):
        msgs = []
        for q, a in pairs_and_last[:-1]:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return msgs + [{"role": "user", "content": pairs_and_last[-1]}]

    # 1) one exchange, then a follow-up fitting the kind of request; every pair is used before any is reused
    order = []
    while len(order) < CHAT_MIX["followup"]:
        order += rng.sample(range(len(pairs)), len(pairs))
    n = 0
    for k in order:
        if n == CHAT_MIX["followup"]:
            break
        kind, q, a = pairs[k]
        for _ in range(20):
            if add(turns((q, a), rng.choice(CHAT_FOLLOWUPS[kind])), "followup"):
                n += 1
                break
    # 2) one exchange, then the user switches to an unrelated request
    n = 0
    while n < CHAT_MIX["switch"]:
        i, j = rng.sample(range(len(pairs)), 2)
        (_, q1, a1), (_, q2, _) = pairs[i], pairs[j]
        n += add(turns((q1, a1), _join(rng.choice(CHAT_SWITCHES), q2)), "switch")
    # 3) two exchanges on different requests, then a follow-up on the second one
    n = 0
    while n < CHAT_MIX["two_exchanges"]:
        i, j = rng.sample(range(len(pairs)), 2)
        (_, q1, a1), (kind2, q2, a2) = pairs[i], pairs[j]
        q2 = _join(rng.choice(["", rng.choice(CHAT_SWITCHES)]), q2)
        n += add(turns((q1, a1), (q2, a2), rng.choice(CHAT_FOLLOWUPS[kind2])), "two_exchanges")
    return rows


# ====================================================================================================== translation
TRANSLATION_TEXTS = [
    "The post office closes early on Saturdays, so send the parcel on Friday.",
    "My neighbour has three cats and a very old parrot that can say hello.",
    "We should leave now if we want to catch the last bus home.",
    "This soup needs a little more salt and some fresh pepper.",
    "The concert was cancelled because the singer lost her voice.",
    "Could you open the window? It is very warm in here.",
    "I usually drink tea in the morning and coffee after lunch.",
    "The new bridge will connect the two halves of the town.",
    "Our teacher asked us to read the first two chapters by Monday.",
    "It snowed all night, and in the morning the roads were white.",
    "He forgot his umbrella at the restaurant yesterday evening.",
    "The doctor told me to rest for a week and drink plenty of water.",
    "Excuse me, is this seat free?",
    "We painted the kitchen yellow last weekend. It looks much brighter now.",
    "The shop on the corner sells fresh flowers every morning.",
    "I lost my keys again. Have you seen them anywhere?",
    "My brother is learning to cook, and his pasta is already quite good.",
    "The festival takes place every year in the main square.",
    "Please switch off your phones during the performance.",
    "She has worked at the same company for fifteen years.",
    "The children built a sandcastle and decorated it with shells.",
    "The price of vegetables has gone up a lot this winter.",
    "Turn left at the traffic lights and the hotel is on your right.",
    "I would like two tickets for the seven o'clock film, please.",
    "Our cat likes to sleep on the warm laptop keyboard.",
    "The swimming pool is closed for cleaning until Wednesday.",
    "He reads the newspaper on the train every morning.",
    "Do you know a good place to eat near the station?",
    "My grandparents met at a dance more than sixty years ago.",
    "The museum has a new exhibition about ancient Egypt.",
    "We need to buy eggs, milk, flour and a bag of apples.",
    "The meeting went well, and the client agreed to our proposal.",
    "It is going to be sunny tomorrow, so let's have a picnic.",
    "My sister plays the cello in a small orchestra.",
    "The lift is out of order. Please use the stairs.",
    "I have been waiting for the plumber since eight o'clock.",
    "The garden looks beautiful now that the roses are in bloom.",
    "Could you speak a little more slowly, please?",
    "The hotel room had a wonderful view of the harbour.",
    "We walked along the river until the sun went down.",
    "This book is so exciting that I couldn't stop reading it.",
    "The bus was full, so we decided to walk to the city centre.",
    "I need to renew my passport before our trip in June.",
    "The baby finally fell asleep after a long day at the zoo.",
    "My phone is broken, so please send me an email instead.",
    "The restaurant only accepts reservations by telephone.",
    "Every Sunday we have lunch with my parents.",
    "The mountain village has only one shop and one small school.",
    "Don't forget to water the tomatoes when it is hot.",
    "The children are excited because it is the last day of school.",
    "Our flight lands at ten past six in the evening.",
    "The cake is in the oven and will be ready in twenty minutes.",
    "I am sorry I am late. The traffic was terrible this morning.",
    "He has never seen the sea before, so this holiday is special for him.",
    "The town hall is the oldest building in the city.",
    "Where can I buy a map of the region?",
    "My friend is a nurse and often works at night.",
    "We are planning to move to a bigger flat next year.",
    "The river flooded after three days of heavy rain.",
    "Can you recommend a good book for a long train journey?",
    "I don't eat meat, but I love fish and vegetables.",
    "The football match ended in a draw.",
    "The new café serves delicious cakes and strong coffee.",
    "Please leave your shoes at the door.",
    "She learned to swim when she was already thirty years old.",
    "This jacket is too small for me. Do you have a larger size?",
    "The students are preparing a play for the end of the year.",
    "The farmer gets up at five o'clock to feed the animals.",
    "We missed the beginning of the film because we couldn't find parking.",
    "My computer is very slow today. I think it needs an update.",
    "The beach was almost empty because it was early in the morning.",
    "Thank you for the lovely dinner. Everything was delicious.",
    "The old castle on the hill is open to visitors in the summer.",
    "I am looking for a birthday present for my father.",
    "Our neighbours are on holiday, so we are feeding their fish.",
    "The bakery makes a special bread with olives and rosemary.",
    "The exam was easier than I expected.",
    "Is breakfast included in the price of the room?",
    "The wind was so strong that it knocked over our fence.",
    "My uncle builds wooden furniture in his garage.",
    "We will celebrate my mother's birthday at a small restaurant by the lake.",
    "I can't find my glasses. I think I left them in the car.",
    "The city has many bicycle paths, so it is easy to ride everywhere.",
    "The doctor's office is on the second floor.",
    "Fresh fish arrives at the market every Tuesday and Friday.",
    "She wrote a letter to her pen friend in Canada.",
    "The painting in the hall was a gift from my aunt.",
    "It's too late to go shopping now. The shops are already closed.",
    "He plays chess with his grandfather every Thursday evening.",
    "The tourists took photos of the fountain in front of the palace.",
    "We need a new washing machine. The old one makes a strange noise.",
    "The library has a quiet room where students can work.",
    "The ferry to the island leaves every two hours.",
    "My daughter wants to become a vet because she loves animals.",
    "The streets were full of people celebrating the victory.",
    "Can I pay by card, or do you only take cash?",
    "After dinner we usually go for a short walk around the block.",
    "The parcel should arrive within three working days.",
    "The village celebrates the harvest with music and dancing.",
    "I forgot to buy bread, so we will have rice tonight.",
    "The train was so crowded that I had to stand the whole way.",
    "The roof leaks when it rains, so we put a bucket under it.",
    "My friends are coming for dinner, and I haven't started cooking yet.",
    "The park is full of children on sunny afternoons.",
    "The pharmacy is next to the bank, opposite the church.",
    "We rented a small house in the countryside for the summer.",
    "The teacher praised the class for their excellent work.",
    "I hope you feel better soon. Let me know if you need anything.",
    "The bookshop is having a sale, and everything is half price.",
    "The kids spent the whole afternoon building a tree house.",
]
TRANSLATION_LANGS = ["French", "Spanish", "German", "Italian"]
TRANSLATION_TEMPLATES = [
    "Translate the following text from English to {lang}:\n\n{text}",
    "Please translate this English passage into {lang}.\n\n{text}",
    "Translate into {lang}:\n{text}",
    "How would you say this in {lang}?\n\n\"{text}\"",
    "Can you translate this into {lang} for me? Keep the tone natural.\n\n{text}",
    "{lang} translation, please:\n\n{text}",
    "I need the following sentence in {lang}:\n\n{text}",
    "Translate to {lang} and keep the meaning exact.\n\nText: {text}",
]


def build_translation(rng: random.Random) -> list[dict]:
    texts = list(TRANSLATION_TEXTS)
    rng.shuffle(texts)
    per_lang = PER_CATEGORY // len(TRANSLATION_LANGS)
    langs = [lang for lang in TRANSLATION_LANGS for _ in range(per_lang)]
    rng.shuffle(langs)
    rows, used = [], defaultdict(set)  # text -> languages it is already used with
    for k, lang in enumerate(langs):
        i = k % len(texts)
        while lang in used[texts[i]]:  # a text used twice gets two different target languages
            i = (i + 1) % len(texts)
        used[texts[i]].add(lang)
        tmpl = rng.randrange(len(TRANSLATION_TEMPLATES))
        rows.append({"prompt": TRANSLATION_TEMPLATES[tmpl].format(lang=lang, text=texts[i]),
                     "source": f"template:translation/en-{lang.lower()}"})
    return rows


# =================================================================================================== math_reasoning
NAMES = ["Anna", "Ben", "Carla", "David", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kemal", "Lucia", "Mateo",
         "Nora", "Omar", "Priya", "Quentin", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]


def _m_change(r, n):
    items, unit = r.choice([("notebooks", 3), ("sandwiches", 4), ("cinema tickets", 9), ("pots of paint", 7),
                            ("bunches of flowers", 6), ("comic books", 5)])
    k, p = r.randint(2, 6), unit + r.randint(0, 3)
    bill = next(b for b in (20, 50, 100) if b > k * p)
    return (f"{n} buys {k} {items} at {p} dollars each and pays with a {bill} dollar note. How much change does "
            f"{n} get?", bill - k * p)


def _m_share(r, n):
    k, each = r.randint(3, 9), r.randint(4, 15)
    thing = r.choice(["stickers", "sweets", "marbles", "trading cards", "strawberries"])
    return (f"{n} has {k * each} {thing} and shares them equally among {k} friends. How many {thing} does each "
            f"friend get?", each)


def _m_distance(r, n):
    v1, t1, v2, t2 = r.randint(8, 25), r.randint(2, 4), r.randint(4, 12), r.randint(1, 3)
    return (f"{n} cycles at {v1} kilometres per hour for {t1} hours, then walks at {v2} kilometres per hour for "
            f"{t2} hours. How many kilometres does {n} travel in total?", v1 * t1 + v2 * t2)


def _m_library(r, n):
    a, b, c = r.randint(300, 900), r.randint(20, 150), r.randint(10, 90)
    place = r.choice(["library", "school library", "bookshop", "community centre"])
    return (f"A {place} has {a} books. It buys {b} new books and gives away {c} old ones. How many books does it "
            f"have now?", a + b - c)


def _m_discount(r, n):
    pct = r.choice([10, 20, 25, 50])
    price = r.randint(2, 20) * 20
    item = r.choice(["jacket", "pair of boots", "lamp", "bicycle helmet", "suitcase", "guitar"])
    return f"A {item} costs {price} dollars. It is on sale for {pct} percent off. What is the sale price in dollars?", \
        price * (100 - pct) // 100


def _m_area(r, n):
    length, width, cost = r.randint(3, 12), r.randint(2, 9), r.randint(5, 30)
    return (f"A room is {length} metres long and {width} metres wide. Carpet costs {cost} dollars per square metre. "
            f"How much does it cost to carpet the whole floor?", length * width * cost)


def _m_minutes(r, n):
    h, m = r.randint(1, 5), r.randint(5, 55)
    what = r.choice(["A film", "A train journey", "A football match with extra time", "A hike", "A school trip"])
    return f"{what} lasts {h} hours and {m} minutes. How many minutes is that in total?", 60 * h + m


def _m_ages(r, n):
    n2 = r.choice([x for x in NAMES if x != n])
    b, d, y = r.randint(4, 30), r.randint(2, 12), r.randint(2, 10)
    total = (b + d + y) + (b + y)
    return (f"{n} is {d} years older than {n2}. In {y} years, the sum of their ages will be {total}. How old is "
            f"{n2} now?", b)


def _m_fraction(r, n):
    num, den = r.choice([(1, 2), (1, 3), (2, 3), (1, 4), (3, 4), (2, 5), (3, 5), (1, 6)])
    total = den * r.randint(20, 90)
    return (f"There are {total} students in a school, and {num}/{den} of them walk to school. How many students do "
            f"not walk to school?", total - total * num // den)


def _m_saving(r, n):
    s, w = r.randint(5, 40), r.randint(6, 30)
    goal = r.choice(["a new bike", "a games console", "a weekend trip", "a telescope", "concert tickets"])
    return (f"{n} wants to buy {goal} for {s * w} dollars and saves {s} dollars every week. After how many weeks "
            f"will {n} have enough money?", w)


def _m_packs(r, n):
    guests, k = r.randint(23, 140), r.choice([6, 8, 10, 12])
    thing = r.choice(["plates", "cups", "chairs", "name badges", "napkins"])
    return (f"{n} is expecting {guests} guests at a party. {thing.capitalize()} are sold in packs of {k}. How many "
            f"packs does {n} need so that every guest gets one?", math.ceil(guests / k))


def _m_average(r, n):
    while True:
        a, b, c = r.randint(55, 100), r.randint(55, 100), r.randint(55, 100)
        if (a + b + c) % 3 == 0:
            break
    return f"{n} scored {a}, {b} and {c} points in three tests. What is the average score?", (a + b + c) // 3


def _m_unit_price(r, n):
    a, p, b = r.randint(2, 6), r.randint(2, 7), r.randint(7, 15)
    fruit = r.choice(["apples", "pears", "cherries", "potatoes", "oranges"])
    return f"At the market, {a} kilograms of {fruit} cost {a * p} dollars. How much do {b} kilograms cost?", b * p


def _m_overtime(r, n):
    w, h = r.randint(10, 25), r.randint(41, 50)
    w2 = w + r.choice([5, 6, 8, 10])
    return (f"{n} earns {w} dollars per hour for the first 40 hours of a week and {w2} dollars per hour for every "
            f"hour after that. How much does {n} earn in a week with {h} hours of work?", 40 * w + (h - 40) * w2)


def _m_fence(r, n):
    s, c = r.randint(5, 25), r.randint(3, 15)
    return (f"A square garden has sides of {s} metres. A fence costs {c} dollars per metre. How much does it cost to "
            f"put a fence all the way around the garden?", 4 * s * c)


def _m_pencils(r, n):
    while True:
        p, k, g, s = r.randint(3, 10), r.choice([10, 12, 24]), r.randint(2, 4), r.randint(10, 30)
        if p * k > g * s:
            break
    return (f"A teacher buys {p} packs of pencils with {k} pencils in each pack. She gives {g} pencils to each of her "
            f"{s} students. How many pencils are left?", p * k - g * s)


def _m_pages(r, n):
    a, b = r.randint(10, 40), r.randint(20, 80)
    return (f"{n} reads {a} pages a day on weekdays and {b} pages a day at the weekend. How many pages does {n} read "
            f"in one week?", 5 * a + 2 * b)


def _m_ratio(r, n):
    a, b = r.choice([(2, 3), (3, 4), (1, 2), (3, 5), (4, 5), (5, 3), (2, 1)])
    total = (a + b) * r.randint(4, 15)
    club = r.choice(["chess club", "choir", "swimming team", "drama group", "robotics club"])
    return (f"The ratio of boys to girls in a {club} is {a}:{b}. The {club} has {total} members. How many girls are "
            f"in it?", total * b // (a + b))


def _m_money_left(r, n):
    m, x = 4 * r.randint(10, 60), r.randint(3, 15)
    return (f"{n} had {m} dollars, spent a quarter of it on a book and then {x} dollars on lunch. How much money does "
            f"{n} have left?", m - m // 4 - x)


def _m_tickets(r, n):
    a, c, na, nc = r.randint(10, 30), r.randint(4, 12), r.randint(1, 3), r.randint(1, 5)
    place = r.choice(["zoo", "museum", "theme park", "aquarium", "circus"])
    return (f"Adult tickets for the {place} cost {a} dollars and child tickets cost {c} dollars. How much does a "
            f"family of {na} adults and {nc} children pay?", na * a + nc * c)


def _m_temperature(r, n):
    t, up, down = r.randint(-8, 12), r.randint(3, 14), r.randint(5, 20)
    return (f"At 6 am the temperature was {t} degrees. By noon it had risen by {up} degrees, and by midnight it had "
            f"fallen by {down} degrees from the noon value. What was the temperature at midnight?", t + up - down)


def _m_fuel(r, n):
    f, d = r.randint(4, 9), r.randint(2, 9)
    return (f"{n}'s car uses {f} litres of fuel per 100 kilometres. How many litres does it use for a trip of "
            f"{d * 100} kilometres?", f * d)


MATH_TEMPLATES = [_m_change, _m_share, _m_distance, _m_library, _m_discount, _m_area, _m_minutes, _m_ages,
                  _m_fraction, _m_saving, _m_packs, _m_average, _m_unit_price, _m_overtime, _m_fence, _m_pencils,
                  _m_pages, _m_ratio, _m_money_left, _m_tickets, _m_temperature, _m_fuel]


def build_math(rng: random.Random) -> list[dict]:
    rows, seen = [], set()
    k = 0
    while len(rows) < PER_CATEGORY:
        fn = MATH_TEMPLATES[k % len(MATH_TEMPLATES)]
        k += 1
        text, answer = fn(rng, rng.choice(NAMES))
        if text in seen:
            continue
        seen.add(text)
        assert isinstance(answer, int), (fn.__name__, answer)
        rows.append({"prompt": text, "answer": answer, "source": f"template:math_reasoning/{fn.__name__[3:]}"})
    return rows


# =========================================================================================== stdlib docstrings
# Modules whose docstrings are read; deprecated modules (PEP 594) and ones with import side effects are left out.
DOC_MODULES = [
    "abc", "argparse", "ast", "asyncio.events", "asyncio.locks", "asyncio.queues", "asyncio.streams",
    "asyncio.base_events", "asyncio.futures", "asyncio.runners", "asyncio.subprocess", "asyncio.tasks",
    "asyncio.transports", "atexit", "base64", "builtins", "bdb", "binascii", "bisect", "bz2", "calendar", "cmd", "code",
    "codecs", "codeop", "collections", "collections.abc", "colorsys", "compileall", "concurrent.futures",
    "configparser", "contextlib", "contextvars", "copy", "copyreg", "csv", "dataclasses", "datetime", "dbm", "decimal",
    "difflib", "dis", "doctest", "email.charset", "email.generator", "email.header", "email.headerregistry",
    "email.message", "email.parser", "email.policy", "email.utils", "email.contentmanager", "email.feedparser", "enum",
    "errno", "faulthandler", "fcntl", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac", "html", "html.parser", "http.client",
    "http.cookiejar", "http.cookies", "http.server", "imaplib", "importlib", "importlib.abc", "importlib.metadata",
    "importlib.resources", "importlib.util", "importlib.machinery", "inspect", "io", "ipaddress", "itertools", "json",
    "json.decoder", "json.encoder", "keyword", "linecache", "locale", "logging", "logging.config", "logging.handlers",
    "lzma", "mailbox", "math", "mimetypes", "modulefinder", "multiprocessing.connection", "multiprocessing.context",
    "multiprocessing.managers", "multiprocessing.pool", "multiprocessing.queues", "multiprocessing.shared_memory",
    "multiprocessing.synchronize", "gc", "array", "mmap", "select", "resource", "sys", "time", "unicodedata",
    "concurrent.futures.process", "concurrent.futures.thread", "pydoc", "netrc", "numbers", "operator", "optparse",
    "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath", "pprint",
    "profile", "pstats", "queue", "quopri", "random", "re", "reprlib", "runpy", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "signal", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics",
    "string", "struct", "subprocess", "symtable", "sysconfig", "tabnanny", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "types", "typing", "unittest",
    "unittest.case", "unittest.loader", "unittest.mock", "unittest.result", "unittest.runner", "unittest.suite",
    "urllib.error", "urllib.parse", "urllib.request", "urllib.robotparser", "uuid", "warnings", "wave", "weakref",
    "wsgiref.handlers", "wsgiref.headers", "wsgiref.simple_server", "wsgiref.util", "xml.dom.minidom",
    "xml.dom.pulldom", "xml.etree.ElementTree", "xml.sax.handler", "xml.sax.saxutils", "xml.sax.xmlreader",
    "xmlrpc.client", "xmlrpc.server", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
]
MAX_DOCS_PER_MODULE = 10  # per top-level package, so that the selection spreads over many modules


def _resolve(source: str):
    """The object a dotted ``stdlib_docs.jsonl`` source names (longest importable module prefix, then getattr)."""
    parts = source.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:
            continue
        try:
            for p in parts[cut:]:
                obj = getattr(obj, p)
        except AttributeError:
            return None
        return obj
    return None


def _doc_ok(text: str) -> bool:
    if not (DOC_MIN_CHARS <= len(text) <= DOC_MAX_CHARS) or len(text.split()) < 40:
        return False
    if sum(c.isalpha() for c in text) < 0.55 * len(text) or sum(ord(c) > 127 for c in text) > 0.02 * len(text):
        return False
    first = text.splitlines()[0].lower()
    return "deprecated" not in first and "undocumented" not in first


def collect_docstrings(excluded_docs: list[dict]) -> list[dict]:
    """Candidate docstrings of the running standard library, minus everything used by ``stdlib_docs.jsonl``."""
    excl_sources = {d["source"] for d in excluded_docs}
    excl_classes = {d["source"] for d in excluded_docs if d.get("kind") == "class"}
    excl_texts = [_norm(d["text"]) for d in excluded_docs]
    excl_objs = [o for o in (_resolve(s) for s in sorted(excl_sources)) if o is not None]  # kept alive for id()
    excl_ids = {id(o) for o in excl_objs}

    def excluded(source, obj, text):
        if source in excl_sources or any(source.startswith(c + ".") for c in excl_classes) or id(obj) in excl_ids:
            return True
        t = _norm(text)
        return any(t == e or t in e or e in t for e in excl_texts)

    out, seen_texts, seen_ids = [], set(), set()

    def add(source, kind, obj):
        doc = getattr(obj, "__doc__", None)  # not inspect.getdoc: no docstrings inherited from base classes
        if not isinstance(doc, str) or id(obj) in seen_ids:
            return
        text = inspect.cleandoc(doc).strip()
        if not _doc_ok(text) or _norm(text) in seen_texts or excluded(source, obj, text):
            return
        seen_ids.add(id(obj))
        seen_texts.add(_norm(text))
        out.append({"source": source, "kind": kind, "text": text, "module": source.split(".")[0]})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            try:
                mod = importlib.import_module(name)
            except Exception:  # not built into this interpreter (e.g. no _ssl / _sqlite3): skip
                continue
            add(name, "module", mod)
            # objects defined in the module itself or in its C accelerator (heapq -> _heapq, os -> posix)
            homes = {mod.__name__, "_" + mod.__name__.rsplit(".", 1)[-1]} | ({"posix"} if name == "os" else set())
            for attr, obj in sorted(vars(mod).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) not in homes:
                    continue
                if inspect.isclass(obj):
                    add(f"{name}.{attr}", "class", obj)
                    for mname, member in sorted(vars(obj).items()):
                        if mname.startswith("_"):
                            continue
                        if isinstance(member, (classmethod, staticmethod)):
                            member = member.__func__
                        if isinstance(member, property):
                            add(f"{name}.{attr}.{mname}", "property", member)
                        elif inspect.isfunction(member) or inspect.ismethoddescriptor(member):
                            add(f"{name}.{attr}.{mname}", "method", member)
                elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    add(f"{name}.{attr}", "function", obj)
    return out


def select_docstrings(cands: list[dict], n: int, rng: random.Random) -> list[dict]:
    """``n`` docstrings spread over as many modules as possible (round robin over shuffled per-module lists)."""
    by_mod = defaultdict(list)
    for c in cands:
        by_mod[c["module"]].append(c)
    mods = sorted(by_mod)
    for m in mods:
        rng.shuffle(by_mod[m])
        by_mod[m] = by_mod[m][:MAX_DOCS_PER_MODULE]
    rng.shuffle(mods)
    picked = []
    for rnd in range(MAX_DOCS_PER_MODULE):
        for m in mods:
            if rnd < len(by_mod[m]) and len(picked) < n:
                picked.append(by_mod[m][rnd])
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} usable docstrings, need {n}")
    rng.shuffle(picked)
    return picked


SUMMARY_TEMPLATES = [
    "Summarise the following Python documentation in two or three sentences.\n\n{doc}",
    "Here is the docstring of `{name}` from the Python standard library:\n\n{doc}\n\nWrite a short summary of what it "
    "describes.",
    "Read this documentation and give a one-paragraph summary for a beginner.\n\n---\n{doc}\n---",
    "Summarize the key points of the following text as three bullet points.\n\n{doc}",
    "Documentation of `{name}`:\n\n{doc}\n\nIn a few sentences, what is this used for?",
    "TL;DR the following documentation:\n\n{doc}",
    "Explain in plain English what the following documentation says. Keep it under 100 words.\n\n{doc}",
    "Below is the documentation for `{name}`.\n\n\"\"\"\n{doc}\n\"\"\"\n\nWrite a one-sentence summary, then list the "
    "most important details.",
    "Give a brief overview of `{name}` based only on this docstring:\n\n{doc}",
    "Condense this Python docstring into a short paragraph that a busy developer could read in ten seconds.\n\n{doc}",
]
RAG_TEMPLATES = [
    "Answer the question using only the context below.\n\nContext (documentation of `{name}`):\n{doc}\n\n"
    "Question: {q}",
    "Context:\n\"\"\"\n{doc}\n\"\"\"\n\nBased on the context above, {q_lower}",
    "You are given a retrieved document from the Python docs.\n\n[Document: {name}]\n{doc}\n\n[Question]\n{q}\n"
    "Answer briefly and quote the document where possible.",
    "Use the documentation excerpt to answer the question. If the excerpt does not say, answer that it is not "
    "stated.\n\nExcerpt from the docs of `{name}`:\n{doc}\n\nQuestion: {q}",
    "{q}\n\nRelevant documentation:\n\n{doc}",
]


def rag_questions(d: dict) -> list[str]:
    """Generic questions that the docstring ``d`` can answer, chosen from what its text mentions."""
    n, text, kind = d["source"], d["text"], d["kind"]
    low = text.lower()
    qs = []
    if kind == "module":
        qs += [f"According to the documentation, what is the `{n}` module used for?",
               f"Which functions or classes does the documentation of the `{n}` module mention?",
               f"What are the main features of the `{n}` module, according to its documentation?"]
    elif kind == "class":
        qs += [f"What is the `{n}` class used for?", f"According to the documentation, what does `{n}` represent?"]
        if re.search(r"argument|parameter|keyword|=", low):
            qs.append(f"What arguments does the `{n}` constructor accept?")
        if "method" in low or "attribute" in low:
            qs.append(f"Which methods or attributes of `{n}` does the documentation mention?")
    elif kind == "property":
        qs += [f"According to the documentation, what does the `{n}` property hold?",
               f"What is `{n}` used for?"]
    else:
        qs.append(f"According to the documentation, what is `{n}` used for?")
        if re.search(r"\breturns?\b", low):
            qs.append(f"What does `{n}` return?")
        if re.search(r"argument|parameter|keyword|\bif \w+ is\b|=", low):
            qs.append(f"What arguments does `{n}` take?")
    if re.search(r"\braises?\b|\w+error\b|exception", low):
        qs.append(f"Which exceptions or errors are mentioned in the documentation of `{n}`, and when do they occur?")
    if "default" in low:
        qs.append(f"What default values or default behaviour does the documentation of `{n}` describe?")
    if ">>>" in text:
        qs.append(f"What does the example in the documentation of `{n}` show?")
    return qs


def build_doc_categories(rng: random.Random, excluded_docs: list[dict]) -> tuple[list[dict], list[dict]]:
    cands = collect_docstrings(excluded_docs)
    docs = select_docstrings(cands, 2 * PER_CATEGORY, rng)
    summ, rag = [], []
    for i, d in enumerate(docs[:PER_CATEGORY]):
        tmpl = SUMMARY_TEMPLATES[i % len(SUMMARY_TEMPLATES)]
        summ.append({"prompt": tmpl.format(name=d["source"], doc=d["text"]),
                     "source": f"python-stdlib:{d['source']}"})
    for i, d in enumerate(docs[PER_CATEGORY:]):
        q = rng.choice(rag_questions(d))
        tmpl = RAG_TEMPLATES[i % len(RAG_TEMPLATES)]
        rag.append({"prompt": tmpl.format(name=d["source"], doc=d["text"], q=q, q_lower=q[0].lower() + q[1:]),
                    "source": f"python-stdlib:{d['source']}"})
    print(f"docstrings: {len(cands)} candidates after exclusions, {len(docs)} used from "
          f"{len({d['module'] for d in docs})} modules", file=sys.stderr)
    return summ, rag


# ======================================================================================================= checks
def _user_turns(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [_norm(prompt)]
    return [_norm(m["content"]) for m in prompt if m["role"] == "user"]


def check(rows: list[dict], benchmark: list[dict], excluded_docs: list[dict]) -> None:
    bench_turns = {t for r in benchmark for t in _user_turns(r["prompt"])}
    bench_sources = {d["source"] for d in excluded_docs}
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids), "duplicate ids"
    keys = [json.dumps(r["prompt"], sort_keys=True) for r in rows]
    assert len(set(keys)) == len(keys), "duplicate prompts"
    assert len({_norm(" ".join(_user_turns(r["prompt"]))) for r in rows}) == len(rows), "duplicate prompts"
    for r in rows:
        clash = set(_user_turns(r["prompt"])) & bench_turns
        assert not clash, (r["id"], clash)
        if r["source"].startswith("python-stdlib:"):
            assert r["source"].removeprefix("python-stdlib:") not in bench_sources, r["id"]
        if r["category"] == "multi_turn_chat":
            assert r["prompt"][-1]["role"] == "user", r["id"]
    counts = Counter(r["category"] for r in rows)
    assert all(counts[c] == PER_CATEGORY for c in CATEGORIES), counts


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    if platform.python_version() != REFERENCE_PYTHON:
        print(f"warning: the committed file was built with Python {REFERENCE_PYTHON}, this is "
              f"{platform.python_version()}; the docstring categories will differ", file=sys.stderr)

    benchmark = _read_jsonl(BENCHMARK)
    excluded_docs = _read_jsonl(STDLIB_DOCS)
    summ, rag = build_doc_categories(random.Random(SEED + 3), excluded_docs)
    built = {
        "multi_turn_chat": build_chat(random.Random(SEED + 1)),
        "translation": build_translation(random.Random(SEED + 2)),
        "summarization": summ,
        "qa": build_qa(random.Random(SEED + 4)),
        "math_reasoning": build_math(random.Random(SEED + 5)),
        "rag_qa": rag,
    }
    rows = []
    for cat in CATEGORIES:
        items = built[cat]
        random.Random(f"{SEED}-{cat}").shuffle(items)  # interleave the template families
        for i, item in enumerate(items, 1):
            row = {"id": f"distill-{cat}-{i:04d}", "category": cat, "prompt": item["prompt"]}
            if "answer" in item:
                row["answer"] = item["answer"]
            row["source"] = item["source"]
            rows.append(row)
    check(rows, benchmark, excluded_docs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} prompts to {args.out}: {dict(Counter(r['category'] for r in rows))}", file=sys.stderr)


if __name__ == "__main__":
    main()
