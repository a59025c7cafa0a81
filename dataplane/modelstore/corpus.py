"""The English text the random models' tokenizer is trained on.

Bundled rather than downloaded so a tokenizer can be made offline and byte for byte the same on
every machine. It mixes prose, dialogue, numbers and punctuation so common words and symbols get
their own merges.
"""

from __future__ import annotations

CORPUS = """\
The river runs past the old town and turns east toward the sea. In the morning the water is grey
and still, and by noon the light makes it green. People walk along the bank with their dogs, and
children throw small stones to watch the rings spread out across the surface.

Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.
Madrid is the capital of Spain. London is the capital of the United Kingdom. Tokyo is the capital
of Japan. Ottawa is the capital of Canada, and Canberra is the capital of Australia.

"What time is it?" she asked.
"It is a quarter past three," he said. "The train leaves at four, so we still have time for tea."
"Then let us sit by the window and watch the rain."

A computer program is a list of instructions. The machine reads each instruction in order, does
what it says, and moves on to the next one. Some instructions make the machine jump back to an
earlier step, which is how a program can repeat a task many times without being told again.

One, two, three, four, five, six, seven, eight, nine, ten. Eleven, twelve, thirteen, fourteen,
fifteen. Twenty, thirty, forty, fifty, sixty, seventy, eighty, ninety, one hundred, one thousand.
0 1 2 3 4 5 6 7 8 9 10 11 12 16 20 32 64 100 128 256 512 1000 1024 2048 4096 2024 2025.
3 + 4 = 7. 12 - 5 = 7. 6 * 7 = 42. 81 / 9 = 9. The answer is 42. Half of 10 is 5.

User: Can you help me write a short poem about the moon?
Assistant: Of course. Here is a short poem:
The moon is a lamp on the edge of the night,
it does not burn, it only borrows light.
User: Thank you! That is lovely.
Assistant: You are welcome. Let me know if you would like another one.

The weather today will be cloudy with a chance of rain in the afternoon. Temperatures will reach
eighteen degrees in the city and fifteen degrees on the coast. Tomorrow should be warmer and dry,
with light winds from the south and clear skies in the evening.

To make bread, mix flour, water, salt and yeast in a large bowl. Knead the dough for ten minutes
until it is smooth. Leave it in a warm place for an hour so that it can rise. Shape the loaf, let
it rise again, and bake it in a hot oven for about thirty-five minutes.

The history of science is a history of questions. Why does the sun rise in the east? What are the
stars made of? How do plants turn light into food? Each answer opened new questions, and each new
question needed better tools: the telescope, the microscope, the clock and, later, the computer.

Good morning! How are you today? I am fine, thank you. And you? I am well. It is a beautiful day,
isn't it? Yes, it's very nice. We're going to the park later; would you like to come with us?

The library opens at nine o'clock and closes at six. Books may be borrowed for three weeks. If you
need a book for longer, you can renew it at the desk or on the website. Please return books on time
so that other readers can enjoy them too.

In the garden there are roses, tulips and a small apple tree. Every spring the tree is covered with
white flowers, and every autumn it gives a basket of red apples. The birds like the apples as much
as we do, so we always leave a few on the branches for them.

A good answer is short, clear and correct. If a question is not clear, it is better to ask what
the person means than to guess. If you do not know the answer, say so, and explain how to find it.

Email: hello@example.com. Website: https://example.com/docs/index.html. Phone: +1 (555) 010-0199.
Prices: $5.99, $12.50, 20% off. Dates: 2024-01-15, March 3rd, the 21st century. Time: 10:30 am.
Symbols: # @ & * ( ) [ ] { } < > / \\ | ~ ^ _ - + = : ; , . ! ? ' " `
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))

The end of the story is not the end of the road. The travellers rested for a night, and in the
morning they packed their bags, thanked their hosts and walked on toward the mountains, where the
snow was still deep and the paths were narrow, quiet and beautiful.
"""
