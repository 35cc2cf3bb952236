"""A small English topic-classification set embedded in the package: the CLI's default calibration data.

Four topics, sixteen short sentences each, written for this package (no download, no licence question).
"""

from __future__ import annotations

TOPICS: dict[str, list[str]] = {
    "sports": [
        "The striker scored twice in the second half to win the match.",
        "Our team trained on the track every morning before the final.",
        "The goalkeeper saved a penalty in the last minute of the game.",
        "She broke the national record in the hundred metre sprint.",
        "The coach changed the line-up after the defeat on Sunday.",
        "Fans filled the stadium to watch the championship decider.",
        "He served three aces in a row and took the opening set.",
        "The cyclists climbed the mountain stage in heavy rain.",
        "The referee showed a red card after a late tackle.",
        "Our basketball club signed a tall young centre this summer.",
        "The marathon runners passed the bridge at the halfway point.",
        "A late goal sent the home side through to the semi-final.",
        "The swimmer won gold in the relay with her teammates.",
        "The boxer defended his title over twelve hard rounds.",
        "The golfer sank a long putt on the eighteenth hole.",
        "Tickets for the cup final sold out within an hour.",
    ],
    "cooking": [
        "Chop the onions finely and fry them slowly in butter.",
        "Bake the bread for forty minutes until the crust is golden.",
        "Add a pinch of salt and a little lemon juice to the sauce.",
        "Simmer the tomato soup gently and stir it now and then.",
        "Whisk the eggs with sugar until the mixture turns pale.",
        "Roast the vegetables with olive oil, garlic and rosemary.",
        "Let the dough rest in a warm place for an hour.",
        "Season the steak with pepper before it goes in the pan.",
        "Grate the cheese over the pasta just before serving.",
        "Boil the rice in salted water for twelve minutes.",
        "Melt the chocolate over a bowl of hot water.",
        "Marinate the chicken overnight in yoghurt and spices.",
        "Peel the potatoes and cut them into even chunks.",
        "Fold the flour into the batter with a wooden spoon.",
        "Serve the curry with fresh coriander and warm flatbread.",
        "Keep the stock on a low heat so it does not boil over.",
    ],
    "technology": [
        "The new phone has a faster chip and a brighter screen.",
        "Update the operating system to fix the security flaw.",
        "The laptop battery now lasts a full working day.",
        "Engineers released a patch for the crashing web browser.",
        "The company launched a cloud service for small businesses.",
        "This graphics card trains neural networks much faster.",
        "Restart the router if the wireless connection drops.",
        "The app stores your files in an encrypted folder.",
        "Developers moved the database to a cluster of servers.",
        "The smartwatch tracks your heart rate while you sleep.",
        "A bug in the compiler produced the wrong machine code.",
        "The printer connects to the network without any cables.",
        "Back up your photos before you reset the tablet.",
        "The startup builds software that reads scanned invoices.",
        "New solid-state drives load programs in a few seconds.",
        "The keyboard shortcut opens a terminal window.",
    ],
    "weather": [
        "Heavy rain is expected across the north this evening.",
        "A cold front will bring snow to the hills tomorrow.",
        "The afternoon will be sunny with a light westerly breeze.",
        "Thick fog made driving difficult early this morning.",
        "Temperatures will climb above thirty degrees by Friday.",
        "Strong winds brought down trees along the coast.",
        "Thunderstorms may cause flooding in low-lying areas.",
        "The night will be clear and frosty in rural places.",
        "Showers will die out and skies will clear by noon.",
        "A heat wave has kept the city dry for two weeks.",
        "Forecasters warned of ice on the roads overnight.",
        "Clouds will build later with a chance of drizzle.",
        "The hurricane is moving slowly toward the islands.",
        "It will stay mild and damp for the rest of the week.",
        "Hail fell for ten minutes during the afternoon storm.",
        "The weekend looks bright but chilly with some frost.",
    ],
}


def demo_examples() -> tuple[list[str], list[int], list[str]]:
    """Texts, integer labels and label names of the embedded set, topics interleaved."""
    names = list(TOPICS)
    texts, labels = [], []
    for row in range(max(len(sentences) for sentences in TOPICS.values())):
        for label, name in enumerate(names):
            if row < len(TOPICS[name]):
                texts.append(TOPICS[name][row])
                labels.append(label)
    return texts, labels, names
