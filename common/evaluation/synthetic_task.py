"""The grammar of the bundled synthetic task, in one place: topics, tips, openers, closers and the rest.

`data/make_synthetic.py` generates `data/synthetic/` from it; `common/evaluation/gold.py` scores any text with it.

A prompt asks, in its last Human turn, how to do one of the 40 `TOPICS` ("\\n\\nHuman: ...\\n\\nAssistant:").
An answer of the grammar has one of three quality levels:
    best (2)     = polite opener + a tip of the prompt's topic + friendly closer
                   (" Happy to help! Let the dough rise until it doubles ... Good luck!")
    mediocre (1) = curt (the on-topic tip alone) or vague (a polite opener + generic advice with no content)
    bad (0)      = rude, a flat refusal, or off topic ("I would rather talk about <other topic>. <its tip>")

`response_level(prompt, response)` is the exact oracle: the level of a response the grammar can produce for
the prompt's topic, or UNRECOGNISED (-1) for any other text.
"""

from __future__ import annotations

from dataclasses import dataclass

BEST, MEDIOCRE, BAD = 2, 1, 0
UNRECOGNISED = -1


@dataclass(frozen=True)
class Topic:
    task: str  # verb phrase that completes "How do I ...?"
    thing: str  # noun phrase for "I would rather talk about ..."
    tips: tuple[str, str]  # topic-specific advice, each a full sentence


TOPICS: tuple[Topic, ...] = (
    Topic("bake bread at home", "bread", (
        "Let the dough rise until it doubles in size, then bake it in a hot oven.",
        "Knead the dough for ten minutes so the bread gets a soft and springy crumb.")),
    Topic("grow tomatoes", "tomatoes", (
        "Plant tomatoes in full sun and water them deeply twice a week.",
        "Tie the tomato stems to a stake so the fruit stays off the ground.")),
    Topic("learn to swim", "swimming", (
        "Start in shallow water and practice floating on your back before you try strokes.",
        "Take lessons with a swimming coach and practice your breathing every day.")),
    Topic("save money each month", "saving money", (
        "Set up an automatic transfer to a savings account on the day you get paid.",
        "Write down every expense for a month to see where your money goes.")),
    Topic("sleep better at night", "sleep", (
        "Go to bed at the same time every night and keep your bedroom dark and cool.",
        "Avoid screens and coffee in the evening so your body can wind down for sleep.")),
    Topic("train a puppy", "puppies", (
        "Reward your puppy with a small treat the moment it follows a command.",
        "Keep puppy training sessions short, about five minutes, and repeat them daily.")),
    Topic("study for an exam", "exams", (
        "Review your notes a little every day and test yourself with practice questions.",
        "Study in short focused blocks and explain each exam topic out loud.")),
    Topic("start running", "running", (
        "Begin with a mix of walking and slow jogging, and add a few minutes each week.",
        "Buy running shoes that fit well and run on soft paths when you can.")),
    Topic("make a cup of tea", "tea", (
        "Pour freshly boiled water over the tea and let it steep for three to five minutes.",
        "Warm the teapot first and use one spoon of loose tea per cup.")),
    Topic("clean a cast iron pan", "cast iron pans", (
        "Scrub the pan with hot water and salt, dry it, then rub in a thin layer of oil.",
        "Never soak a cast iron pan, and dry it on the stove right after washing.")),
    Topic("write a cover letter", "cover letters", (
        "Open with the job you want and give two examples of results you achieved.",
        "Keep the cover letter to one page and match it to the words in the job ad.")),
    Topic("learn a new language", "languages", (
        "Practice with a native speaker every week and learn the most common words first.",
        "Listen to the language for a few minutes each day and repeat phrases out loud.")),
    Topic("fix a flat bike tire", "bike tires", (
        "Remove the wheel, find the hole in the tube, and put on a patch or a new tube.",
        "Pump the bike tire to the pressure printed on its side after you fix it.")),
    Topic("care for a houseplant", "houseplants", (
        "Water the plant only when the top of the soil feels dry and give it bright light.",
        "Use a pot with a drainage hole so the roots of your houseplant do not rot.")),
    Topic("make friends in a new city", "friendship", (
        "Join a club or a class about something you enjoy and go every week.",
        "Say yes to invitations and invite one new person for coffee each week.")),
    Topic("prepare for a job interview", "job interviews", (
        "Research the company and practice answering common interview questions out loud.",
        "Prepare three short stories about your work that show your best skills.")),
    Topic("paint a room", "painting", (
        "Tape the edges, put on a primer, then apply two thin coats of paint.",
        "Cover the floor with a sheet and paint the ceiling before the walls.")),
    Topic("cook rice", "rice", (
        "Rinse the rice, use two cups of water per cup, and simmer it covered for fifteen minutes.",
        "Let the rice rest with the lid on for five minutes after cooking so it turns fluffy.")),
    Topic("reduce stress", "stress", (
        "Take a short walk outside and breathe slowly for a few minutes when you feel tense.",
        "Make a list of what worries you and tackle one small task at a time.")),
    Topic("learn to play guitar", "the guitar", (
        "Learn a few basic chords first and practice switching between them every day.",
        "Tune the guitar before each practice and play slowly along with simple songs.")),
    Topic("keep a car in good shape", "cars", (
        "Change the oil on schedule and check the tire pressure once a month.",
        "Wash the car regularly and have the brakes checked every year.")),
    Topic("plan a trip abroad", "travel", (
        "Check the visa rules early and book your flights and rooms a few months ahead.",
        "Make copies of your passport and tell your bank about your travel dates.")),
    Topic("write a short story", "stories", (
        "Give your main character a clear goal and put an obstacle in the way.",
        "Write the whole first draft quickly, then cut anything the story does not need.")),
    Topic("take better photos", "photography", (
        "Keep the sun behind you and place your subject off center for a better photo.",
        "Hold the camera steady and take several shots of each scene.")),
    Topic("eat more vegetables", "vegetables", (
        "Add a handful of vegetables to every meal, like spinach in eggs or carrots in soup.",
        "Roast vegetables with olive oil and salt to make them sweet and tasty.")),
    Topic("speak in public", "public speaking", (
        "Practice your talk out loud several times and start with a short story.",
        "Look at friendly faces in the audience and pause instead of saying um.")),
    Topic("organize a closet", "closets", (
        "Take everything out, donate what you have not worn in a year, and sort the rest by type.",
        "Use matching hangers and put the clothes you wear most at eye level.")),
    Topic("back up a computer", "backups", (
        "Copy your files to an external drive every week and keep a second copy in the cloud.",
        "Turn on automatic backups and test that you can restore one file.")),
    Topic("brew good coffee", "coffee", (
        "Grind the beans just before brewing and use water that is hot but not boiling.",
        "Use about two spoons of ground coffee for each cup of water.")),
    Topic("get better at chess", "chess", (
        "Solve a few chess puzzles every day and review the games you lose.",
        "Control the center of the board early and develop your knights and bishops.")),
    Topic("start a vegetable garden", "gardening", (
        "Pick a sunny spot, add compost to the soil, and begin with easy plants like beans.",
        "Start small with one raised bed and water the garden in the morning.")),
    Topic("make pancakes", "pancakes", (
        "Mix the batter until just combined and cook the pancakes on a medium hot pan.",
        "Flip the pancake when bubbles form on top and the edges look dry.")),
    Topic("stop procrastinating", "procrastination", (
        "Break the task into tiny steps and work on the first one for just five minutes.",
        "Put your phone in another room and set a timer for focused work.")),
    Topic("teach a child to read", "reading", (
        "Read together every day and point to the words as you say them.",
        "Play games with letter sounds and let the child pick books they like.")),
    Topic("lower an electricity bill", "electricity", (
        "Switch to LED bulbs and turn off devices at the wall when you are not using them.",
        "Wash clothes in cold water and seal drafts around the windows.")),
    Topic("ride a bike safely in traffic", "cycling", (
        "Wear a helmet, use lights at night, and signal before every turn.",
        "Ride in a straight line and make eye contact with drivers at crossings.")),
    Topic("make a budget", "budgets", (
        "List your income, subtract fixed bills, and give every remaining dollar a job.",
        "Review your budget every week and adjust it when your spending changes.")),
    Topic("bake chocolate cookies", "cookies", (
        "Chill the cookie dough for an hour so the cookies spread less and taste richer.",
        "Take the cookies out when the edges are golden and the centers look soft.")),
    Topic("meditate", "meditation", (
        "Sit comfortably for five minutes and gently bring your attention back to your breath.",
        "Meditate at the same time each day and start with a short guided session.")),
    Topic("build a campfire", "campfires", (
        "Start with dry tinder, add small sticks, then larger logs once the flame is strong.",
        "Build the fire in a ring of stones and keep water nearby to put it out.")),
)  # fmt: skip

TEMPLATES: tuple[str, ...] = (
    "How do I {task}?",
    "What is the best way to {task}?",
    "Can you give me a tip on how to {task}?",
    "I want to {task}. Where should I start?",
    "Any advice for someone trying to {task}?",
    "What should I know before I {task}?",
    "Could you help me {task}?",
    "I am struggling to {task}. What would you suggest?",
    "Please explain how to {task}.",
    "Is there an easy way to {task}?",
)
# Repeated empty prefixes make "no prefix" the common case.
PREFIXES = ("", "", "", "Hi! ", "Hello. ", "Quick question. ", "Sorry to bother you. ")
SMALL_TALK = (
    ("Hi, are you there?", "Yes, I am here. What can I do for you?"),
    ("Hello! Can I ask you something?", "Of course, go ahead and ask."),
    ("I have a question for you.", "Sure, what would you like to know?"),
    ("Good morning!", "Good morning! How can I help you today?"),
)
FOLLOW_UPS = ("Thanks! Another question. ", "That helps. ", "Great, thank you. ")

OPENERS = ("Happy to help!", "Great question!", "Sure, glad to help.", "Of course!")
CLOSERS = ("Hope this helps!", "Good luck!", "Let me know if you have more questions.", "Have fun with it!")
GENERIC = (
    "It really depends on your situation, so just try something and see what happens.",
    "There are many ways to do that, and most of them work fine.",
    "You can probably find a lot about that online if you search for it.",
    "Just do your best and it will likely work out in the end.",
)
RUDE = (
    "That is a silly question. Figure it out yourself.",
    "Why would you even ask me that? Stop wasting my time.",
    "Ugh, not this again. Go look it up and leave me alone.",
    "Nobody cares about that. Ask someone else, I am busy.",
)
REFUSALS = (
    "I do not know anything about that and I do not want to help.",
    "I cannot help with that. Do not ask me again.",
    "No idea, and honestly I do not feel like thinking about it.",
)
OFF_TOPIC = "I would rather talk about {thing}. {tip}"


# ----------------------------------------------------------------------------------------------------
# Oracle: the exact level of a response under the grammar above.


def last_question(prompt: str) -> str:
    """The text of the last Human turn of an rm-static prompt."""
    if not prompt.endswith("\n\nAssistant:") or "\n\nHuman: " not in prompt:
        raise ValueError(f"not an rm-static prompt (\\n\\nHuman: ... \\n\\nAssistant:): {prompt!r}")
    return prompt.rsplit("\n\nHuman: ", 1)[1].removesuffix("\n\nAssistant:")


def prompt_topic(prompt: str) -> int:
    """Index in TOPICS of the topic the last Human turn asks about."""
    question = last_question(prompt)
    found = [i for i, t in enumerate(TOPICS) if f" {t.task}?" in question or f" {t.task}." in question]
    if len(found) != 1:
        raise ValueError(f"cannot tell the topic of the last question (matches {found}): {question!r}")
    return found[0]


def _level_table(topic_index: int) -> dict[str, int]:
    table: dict[str, int] = {}
    topic = TOPICS[topic_index]
    for tip in topic.tips:
        table[f" {tip}"] = MEDIOCRE
        for opener in OPENERS:
            for closer in CLOSERS:
                table[f" {opener} {tip} {closer}"] = BEST
    for opener in OPENERS:
        for generic in GENERIC:
            table[f" {opener} {generic}"] = MEDIOCRE
    for line in RUDE + REFUSALS:
        table[f" {line}"] = BAD
    for i, other in enumerate(TOPICS):
        if i != topic_index:
            for tip in other.tips:
                table[" " + OFF_TOPIC.format(thing=other.thing, tip=tip)] = BAD
    return table


_TABLES: dict[int, dict[str, int]] = {}


def response_level(prompt: str, response: str) -> int:
    """Quality level of `response` to `prompt`: BEST 2, MEDIOCRE 1, BAD 0, or UNRECOGNISED -1.

    Exact match against every answer the grammar can produce for the prompt's topic, after stripping
    surrounding whitespace (a model's sample may lack the leading space or carry a trailing newline).
    """
    topic = prompt_topic(prompt)
    if topic not in _TABLES:
        _TABLES[topic] = _level_table(topic)
    return _TABLES[topic].get(" " + response.strip(), UNRECOGNISED)
