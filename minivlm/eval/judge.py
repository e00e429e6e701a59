"""An LLM judge for open answers, over any OpenAI-compatible chat-completions endpoint.

The Chiron-o1 reference asks deepseek-chat (temperature 0.9) whether the model's answer is
semantically similar to the correct one, answering only Yes or No, and counts any "yes" in the
reply as correct. We ask the same question the same way, with plain urllib (no SDK): a POST of
{"model", "messages", "temperature"} to {url}/chat/completions with a Bearer key.

The key is read from an environment variable (MINIVLM_JUDGE_API_KEY by default) so it never
appears in a command line, a log or a results file. Network failures and timeouts are retried
with exponential backoff; when every try fails, `JudgeError` says so on one line.
"""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from minivlm.ranges import above, at_least, between, check_ranges

DEFAULT_API_KEY_ENV = "MINIVLM_JUDGE_API_KEY"
# The reference's service and model, used when a Chiron-style `--api_key` comes without a URL.
REFERENCE_URL = "https://api.deepseek.com"
REFERENCE_MODEL = "deepseek-chat"
PROMPT = ("You are grading an answer to a question. Decide whether the model's answer is "
          "semantically similar to the correct answer.\n"
          "Question: {question}\nModel's answer: {answer}\nCorrect answer: {ground_truth}\n"
          "Reply with only Yes or No.")
# Worth another try: the service is busy or failing, not rejecting the request itself.
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class JudgeConfig:
    url: str = ""  # OpenAI-compatible base URL (".../v1" or the like); empty: no judge
    model: str = REFERENCE_MODEL
    api_key_env: str = DEFAULT_API_KEY_ENV  # the environment variable holding the key
    timeout: float = field(default=60.0, metadata=above(0))  # seconds per request
    # extra tries after a timeout, network error or HTTP 429/5xx
    retries: int = field(default=3, metadata=at_least(0))
    # the reference's; 0..2 is what OpenAI-compatible APIs accept
    temperature: float = field(default=0.9, metadata=between(0, 2))

    def __post_init__(self):
        check_ranges(self)


class JudgeError(ValueError):
    """The judge could not give a verdict; the message is one line."""


class Judge:
    def __init__(self, url: str, model: str, api_key_env: str = DEFAULT_API_KEY_ENV,
                 timeout: float = 60.0, retries: int = 3, temperature: float = 0.9,
                 backoff: float = 1.0, api_key: str | None = None):
        """`api_key` overrides the environment variable (the Chiron `--api_key` flag); it is
        kept only in memory and never shown in `repr` or errors."""
        self.url = url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries = model, timeout, retries
        self.temperature, self.backoff = temperature, backoff
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env, "")

    def __repr__(self) -> str:
        return f"Judge(url={self.url!r}, model={self.model!r})"

    def ask(self, prompt: str) -> str:
        """The reply text to one user message."""
        body = json.dumps({"model": self.model, "temperature": self.temperature,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        last_problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
            except urllib.error.HTTPError as error:
                if error.code in (401, 403):
                    raise JudgeError(f"judge {self.url} refused the API key (HTTP {error.code}); "
                                     "check the key's environment variable") from None
                if error.code not in RETRY_STATUS:
                    raise JudgeError(f"judge {self.url} answered HTTP {error.code} "
                                     f"({error.reason})") from None
                last_problem = f"HTTP {error.code} ({error.reason})"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                reason = getattr(error, "reason", error)
                last_problem = (f"timed out after {self.timeout:g}s"
                                if isinstance(reason, TimeoutError)
                                else " ".join(str(reason).split()) or type(reason).__name__)
            else:
                return self._reply_text(payload)
        tries = self.retries + 1
        raise JudgeError(f"judge {self.url} unreachable after "
                         f"{tries} tr{'y' if tries == 1 else 'ies'}: {last_problem}")

    def _reply_text(self, payload: bytes) -> str:
        try:
            return json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError(f"judge {self.url}: expected a chat-completions reply with "
                             f"choices[0].message.content, got {payload[:80]!r}") from None

    def is_correct(self, question: str, answer: str, ground_truth: str) -> bool:
        """The reference's rule: any "yes" in the reply (any case) counts as correct."""
        reply = self.ask(PROMPT.format(question=question, answer=answer, ground_truth=ground_truth))
        return "yes" in reply.lower()
