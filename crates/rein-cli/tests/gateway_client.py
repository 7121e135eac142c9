"""The official `openai` package against Rein's gateway (run by tests/gateway.rs).

Environment: REIN_BASE_URL (the gateway's `.../v1`), REIN_KEY (a tenant key). Makes a chat
call, a streamed call, then a call the tenant's budget can no longer cover; prints one JSON
object with what it saw. Any surprise raises, which fails the test.
"""

import json
import os

import urllib.request

import openai

base_url = os.environ["REIN_BASE_URL"]
key = os.environ["REIN_KEY"]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=2, timeout=30)
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


def spent():
    request = urllib.request.Request(
        base_url + "/costs", headers={"Authorization": f"Bearer {key}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["total_micros"]


seen = {"spent_before": spent()}

reply = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=20)
seen["chat"] = {
    "content": reply.choices[0].message.content,
    "finish_reason": reply.choices[0].finish_reason,
    "prompt_tokens": reply.usage.prompt_tokens,
    "completion_tokens": reply.usage.completion_tokens,
    "id": reply.id,
}
seen["spent_after_chat"] = spent()

pieces = []
usage = None
stream = client.chat.completions.create(
    model="openai/fake-model",
    messages=messages + [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": "Again, streamed."}],
    max_tokens=20,
    stream=True,
    stream_options={"include_usage": True},
)
finish = None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.total_tokens
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
seen["stream"] = {"pieces": len(pieces), "text": "".join(pieces), "finish_reason": finish, "total_tokens": usage}
seen["spent_after_stream"] = spent()

try:
    client.chat.completions.create(model="fake-model", messages=messages, max_tokens=20)
    seen["refused"] = None
except openai.RateLimitError as e:
    seen["refused"] = {"status": e.status_code, "message": str(e), "should_retry": e.response.headers.get("x-should-retry")}
seen["spent_after_refusal"] = spent()

print(json.dumps(seen))
