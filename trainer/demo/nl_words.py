"""Word lists and sentence templates of the demo's natural-language tasks (``nl_tasks``).

Plain data, written by hand so the demo builds offline and the same on every machine. Each
list is split by position into the entries training sees and the entries only the held-out
test split uses (``nl_tasks.split_pool``), so test accuracy measures generalisation to new
words, not recall of training rows.
"""

from __future__ import annotations

SENTIMENT_SUBJECTS = [
    "the movie", "the food", "the hotel", "this phone", "the service", "the book", "the concert",
    "the staff", "this laptop", "the game", "the show", "the coffee", "the room", "the trip",
    "the album", "the app", "this camera", "the pizza", "the course", "the museum", "the car",
    "the headphones", "the restaurant", "the ending", "the hike", "the lecture",
]  # fmt: skip
POSITIVE_WORDS = [
    "great", "wonderful", "excellent", "amazing", "fantastic", "delightful", "superb", "lovely",
    "brilliant", "perfect", "charming", "outstanding", "pleasant", "enjoyable", "impressive",
    "marvelous", "terrific", "fabulous", "awesome", "splendid", "beautiful", "fun",
]  # fmt: skip
NEGATIVE_WORDS = [
    "terrible", "awful", "boring", "horrible", "disappointing", "dreadful", "poor", "bad",
    "mediocre", "annoying", "dull", "useless", "painful", "rude", "disgusting", "broken",
    "noisy", "overpriced", "frustrating", "weak", "bland", "miserable",
]  # fmt: skip
SENTIMENT_TEMPLATES = [
    "{subject} was {word}.", "honestly, {subject} was {word}.", "I thought {subject} was {word}.",
    "{subject} is {word}.", "{subject} was really {word}.", "what a {word} experience, {subject}!",
    "{subject} turned out {word}.", "I found {subject} {word}.", "{subject}: simply {word}.",
    "overall {subject} felt {word}.",
]  # fmt: skip

TOPIC_WORDS: dict[str, list[str]] = {
    "sports": [
        "striker", "the league final", "the marathon", "the tennis open", "the coach",
        "the goalkeeper", "the world cup", "the olympic team", "the quarterback", "the race",
        "the cricket match", "the boxing title", "the swimmer", "the cup semifinal",
    ],
    "business": [
        "the bank", "shares", "the startup", "the stock market", "the retailer", "oil prices",
        "the merger", "quarterly profits", "the central bank", "investors", "the airline",
        "the carmaker", "the tech giant", "exports",
    ],
    "science": [
        "astronomers", "the telescope", "a new species", "the vaccine trial", "physicists",
        "the mars rover", "the genome study", "researchers", "the comet", "the fossil",
        "the climate model", "the particle collider", "biologists", "the space probe",
    ],
    "politics": [
        "the senate", "the prime minister", "parliament", "the election", "the president",
        "voters", "the governor", "the new law", "the opposition party", "the mayor",
        "the cabinet", "the referendum", "lawmakers", "the campaign",
    ],
}  # fmt: skip
TOPIC_TEMPLATES = [
    "{thing} surprises everyone this week", "{thing} makes headlines again",
    "big news from {thing}", "{thing} breaks a record", "what {thing} means for next year",
    "{thing} faces new questions", "experts react to {thing}", "{thing} in the spotlight",
    "a turning point for {thing}", "{thing} under pressure",
]  # fmt: skip

CITIES = [
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Chicago", "Toronto", "Sydney",
    "Mumbai", "Cairo", "Moscow", "Dublin", "Vienna", "Lisbon", "Seoul", "Boston", "Denver",
    "Prague", "Oslo", "Athens", "Istanbul", "Nairobi", "Lima", "Bangkok", "Amsterdam",
    "Stockholm", "Warsaw", "Miami", "Seattle", "Munich", "Barcelona", "Venice", "Montreal",
    "Shanghai", "Dallas",
]  # fmt: skip
CITY_TEMPLATES = [
    "my sister moved to {city} last year.", "we spent the summer in {city}.",
    "the conference takes place in {city}.", "he was born in {city}.",
    "our flight to {city} was delayed.", "she works at a small bakery in {city}.",
    "they opened a new office in {city}.", "I have never been to {city}.",
    "the train to {city} leaves at noon.", "rain is expected in {city} tomorrow.",
]  # fmt: skip

ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("up", "down"), ("open", "closed"), ("early", "late"), ("rich", "poor"), ("strong", "weak"),
    ("full", "empty"), ("hard", "soft"), ("old", "young"), ("long", "short"), ("wet", "dry"),
    ("high", "low"), ("loud", "quiet"), ("clean", "dirty"), ("thick", "thin"), ("win", "lose"),
    ("true", "false"), ("good", "bad"), ("inside", "outside"), ("buy", "sell"), ("push", "pull"),
    ("heavy", "light"), ("cheap", "expensive"), ("first", "last"), ("love", "hate"),
    ("left", "right"), ("day", "night"), ("begin", "end"), ("accept", "reject"),
    ("arrive", "leave"), ("friend", "enemy"), ("easy", "difficult"), ("safe", "dangerous"),
    ("sweet", "sour"), ("wide", "narrow"), ("deep", "shallow"), ("north", "south"),
    ("east", "west"), ("above", "below"), ("always", "never"), ("brave", "cowardly"),
    ("increase", "decrease"), ("remember", "forget"), ("question", "answer"),
    ("near", "far"), ("asleep", "awake"), ("before", "after"), ("black", "white"),
    ("cheerful", "gloomy"), ("entrance", "exit"), ("future", "past"), ("gentle", "rough"),
    ("healthy", "sick"), ("polite", "rude"), ("sharp", "blunt"), ("give", "take"),
]  # fmt: skip

# Informal → formal: contractions and casual words, each with its one formal spelling
# (whole words, applied left to right; the formal sentence starts with a capital letter).
FORMAL_SWAPS = [
    ("can't", "cannot"), ("won't", "will not"), ("don't", "do not"), ("isn't", "is not"),
    ("didn't", "did not"), ("I'm", "I am"), ("it's", "it is"), ("we're", "we are"),
    ("they're", "they are"), ("gonna", "going to"), ("wanna", "want to"), ("kids", "children"),
    ("stuff", "things"), ("buy", "purchase"), ("get", "obtain"), ("help", "assist"),
]  # fmt: skip
FORMAL_OBJECTS = [
    "report", "tickets", "car", "contract", "package", "invoice", "keys", "laptop", "furniture",
    "documents", "schedule", "budget",
]  # fmt: skip
FORMAL_TEMPLATES = [
    "I can't find the {obj}.", "we're gonna buy the {obj} tomorrow.", "they don't want the {obj}.",
    "it's the {obj} I told you about.", "I'm gonna get the {obj} later.",
    "the kids didn't like the {obj}.", "can you help me with the {obj}?",
    "we won't need the {obj} anymore.", "I wanna buy a new {obj}.",
    "they're selling the {obj} and other stuff.", "the {obj} isn't ready yet.",
    "I didn't get the {obj} on time.", "don't forget the {obj}.",
    "we're gonna help the kids with the {obj}.",
]  # fmt: skip

LANGUAGE_SENTENCES: dict[str, list[str]] = {
    "English": [
        "the weather is nice today", "where is the train station", "I would like a coffee",
        "my brother lives near the sea", "we are going to the market", "this book is very old",
        "the children are playing outside", "can you help me please", "I lost my keys again",
        "the shop closes at six", "she speaks three languages", "dinner is ready",
    ],
    "French": [
        "il fait beau aujourd'hui", "où est la gare", "je voudrais un café",
        "mon frère habite près de la mer", "nous allons au marché", "ce livre est très vieux",
        "les enfants jouent dehors", "pouvez-vous m'aider s'il vous plaît",
        "j'ai encore perdu mes clés", "le magasin ferme à six heures",
        "elle parle trois langues", "le dîner est prêt",
    ],
    "Spanish": [
        "hace buen tiempo hoy", "dónde está la estación de tren", "quisiera un café",
        "mi hermano vive cerca del mar", "vamos al mercado", "este libro es muy viejo",
        "los niños juegan afuera", "puede ayudarme por favor", "perdí mis llaves otra vez",
        "la tienda cierra a las seis", "ella habla tres idiomas", "la cena está lista",
    ],
    "German": [
        "das Wetter ist heute schön", "wo ist der Bahnhof", "ich hätte gern einen Kaffee",
        "mein Bruder wohnt am Meer", "wir gehen auf den Markt", "dieses Buch ist sehr alt",
        "die Kinder spielen draußen", "können Sie mir bitte helfen",
        "ich habe meine Schlüssel wieder verloren", "der Laden schließt um sechs",
        "sie spricht drei Sprachen", "das Abendessen ist fertig",
    ],
    "Italian": [
        "oggi fa bel tempo", "dov'è la stazione", "vorrei un caffè", "mio fratello vive vicino al mare",
        "andiamo al mercato", "questo libro è molto vecchio", "i bambini giocano fuori",
        "mi può aiutare per favore", "ho perso di nuovo le chiavi", "il negozio chiude alle sei",
        "lei parla tre lingue", "la cena è pronta",
    ],
}  # fmt: skip
