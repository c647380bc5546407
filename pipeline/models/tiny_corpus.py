"""Training text for the tiny model's tokenizer (`pipeline.models.tiny_model`).

The tokenizer is trained on this text and nothing else, so the tiny model's files depend only on
the repository. Editing it changes every token id of the tiny model: treat it as frozen.
It mixes the kinds of text the pipeline sees: short chat questions and answers, instructions,
JSON tool definitions and calls, code and numbers.
"""

TEXT = r"""
Hello! How are you today? I am fine, thank you. What can I do for you?
Hi there. Good morning, good afternoon and good evening. Welcome back, it is nice to see you again.
Say hello. Hello, world! Greet me politely. Good day to you, and thank you for asking.
What is the capital of France? The capital of France is Paris. The capital of Germany is Berlin.
The capital of Italy is Rome, the capital of Spain is Madrid and the capital of Japan is Tokyo.
What is the largest planet? Jupiter is the largest planet in our solar system.
How far away is the Moon? The Moon is about 384,400 kilometres (238,855 miles) from the Earth.
What day comes after Monday? Tuesday comes after Monday, then Wednesday, Thursday, Friday,
Saturday and Sunday. January, February, March, April, May, June, July, August, September,
October, November and December are the twelve months of the year.
Name three colours. Red, green and blue. Yellow, orange, purple, pink, brown, black and white.
Tell me a joke. Why did the scarecrow win an award? Because he was outstanding in his field.
Write a haiku about the sea. Waves fold into foam / the grey gull rides the cold wind / salt on every stone.
Describe a sunset. The sky turns orange and gold, the clouds glow pink, and the sun slips below the hills.
Give me a recipe for pancakes. Mix 200 g of flour, 2 eggs, 300 ml of milk and a pinch of salt.
Whisk until smooth, rest the batter for ten minutes, then fry thin pancakes in a hot buttered pan.
How do I boil an egg? Put the egg in boiling water for seven minutes, then cool it in cold water.
Translate 'good morning' to German. Guten Morgen. In French it is bonjour, in Spanish buenos dias.
Who wrote Hamlet? William Shakespeare wrote Hamlet, Macbeth, Othello and King Lear.
Recommend a good book. Try "Pride and Prejudice" by Jane Austen, or "The Hobbit" by J. R. R. Tolkien.
Explain photosynthesis briefly. Plants use sunlight, water and carbon dioxide to make sugar and oxygen.
What is machine learning? Machine learning is a way of building programs that learn patterns from data
instead of following rules written by hand. A model is trained on examples, evaluated on held-out data,
and then used to make predictions. Deep learning uses neural networks with many layers.
What is 2 + 2? 2 + 2 = 4. 3 * 7 = 21. 10 / 4 = 2.5. 100 - 37 = 63. The square root of 81 is 9.
Suggest a name for a cat. How about Luna, Milo, Oliver, Bella or Whiskers?
Can you help me with my homework? Of course. Tell me the question and show me what you have tried.
What is your name? I am a helpful assistant. I answer questions, write text and call tools.
You are a helpful assistant. You answer briefly. Answer the question in one sentence.
Please summarize the following text in three bullet points. Please be concise and accurate.
I'm sorry, but I can't help with that. Let me know if there is anything else I can do.
Sure! Here is a short answer. Here are a few ideas you might like. Let's think step by step.
The weather today is sunny with a high of 24 degrees and a light breeze from the west.
What's the weather like in London? It is cloudy and 15 degrees Celsius, with rain expected later.
It's raining in Seattle, it'll be warm in Madrid tomorrow, and they've seen snow in Denver.
We're going to the park; you'd like it there. I've read that book, and I'll lend it to you.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump!

Once upon a time, in a small village by the river, there lived an old baker who woke before dawn every
day. He lit the oven, kneaded the dough and sang quietly while the bread rose. People came from the
neighbouring towns to buy his loaves, and children waited by the door for the first warm rolls.
One winter the river froze and the mill stopped turning. Without flour the baker could not bake, so
he walked to the mill with his neighbours, and together they broke the ice and freed the wheel.

A batch job reads rows from Parquet files, renders each request with the model's chat template,
tokenizes the prompt, and sends it to the inference engine. The engine generates a response for every
row, and the job writes the results, the token counts and the finish reason to new Parquet files.
If a row is invalid, the job records an error for that row and carries on with the others.
The input schema lists the fields of a request: prompt, raw, messages, tools, functions, stream,
max_tokens, temperature, top_p, top_k, seed, repetition_penalty, frequency_penalty,
presence_penalty and lora. The response holds the generated text and any tool calls.
Fine-tuning with LoRA trains small low-rank matrices beside the frozen weights of the base model.
An adapter has a rank, a scaling factor alpha and a list of target modules such as q_proj, k_proj,
v_proj, o_proj, gate_proj, up_proj and down_proj. Training uses a learning rate, a batch size,
a number of steps and a maximum sequence length; the loss should go down as the steps go by.

Given the following functions, please respond with a JSON for a function call with its proper
arguments that best answers the given prompt.
Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.
Do not use variables.
{
    "type": "function",
    "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {
                    "type": "string",
                    "description": "The city and state, e.g. San Francisco, CA"
                },
                "unit": {
                    "type": "string",
                    "enum": ["celsius", "fahrenheit"]
                }
            },
            "required": ["location"]
        }
    }
}
{"name": "get_current_weather", "parameters": {"location": "Paris, France", "unit": "celsius"}}
{"name": "search_web", "parameters": {"query": "latest news about the Mars rover"}}
{"name": "send_email", "parameters": {"to": "alice@example.com", "subject": "Meeting", "body": "See you at 10:30."}}
{"name": "calculate", "parameters": {"expression": "(12 + 30) * 2"}}
{"temperature": 21.5, "humidity": 0.64, "conditions": "partly cloudy", "ok": true, "error": null}
<|python_tag|>brave_search.call(query="weather in Stockholm")
Environment: ipython
Tools: brave_search, wolfram_alpha
Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

def fibonacci(n: int) -> list[int]:
    '''Return the first n Fibonacci numbers.'''
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value


for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

import json
data = json.loads('{"id": 42, "items": [1, 2, 3], "name": "example"}')
result = {key: value for key, value in data.items() if value is not None}

SELECT name, COUNT(*) AS total FROM orders WHERE status = 'shipped' GROUP BY name ORDER BY total DESC;

function add(a, b) {
  return a + b;
}
const list = [1, 2, 3].map((x) => x * 2);

$ python -m pipeline.generate.job --input data/requests.parquet --output outputs/run-01
$ git commit -m "Add the tiny model" && git push origin main
https://example.com/docs/getting-started?page=2#install

Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 40 50 60 70 80 90 100 128 256
512 1000 1024 2048 4096 8192 2023 2024 2025 3.14159 2.71828 -1 -0.5 1e-5 50% 99.9% $19.99 #1 @home
Dates: 26 Jul 2024, 1 Jan 2025, 31 Dec 2023, 2024-07-26, 12:00, 09:45:30.
Punctuation: , . ; : ! ? ' " ( ) [ ] { } < > / \ | - _ + = * & ^ % $ # @ ~ `
Accents and other scripts: café, naïve, über, Zürich, São Paulo, Ελλάδα, Москва, 東京, 北京, 서울, مرحبا.
Emoji: 🙂 👍 🚀 ✨
"""
