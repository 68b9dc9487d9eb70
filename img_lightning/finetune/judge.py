"""Optional LLM judge: are the model's answer and the reference instruction the same edit?

The paper checks its finetuned MLLM with a yes/no question about semantic consistency; here an LLM
behind any OpenAI-compatible chat endpoint (``eval.judge.endpoint``: OpenAI, vLLM, llama.cpp,
...) answers it. Off by default, never needed by the tests (they inject a transport or run a local
stand-in server). The API key is read from the environment variable ``eval.judge.api_key_env``,
never from a config file.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

from ..config.finetune_mllm import JudgeConfig
from ..errors import UserError

Transport = Callable[[str, dict, dict, float], dict]  # (url, payload, headers, timeout) -> response JSON


class JudgeError(UserError, RuntimeError):
    """The judge endpoint cannot be reached or answers something that is not a chat completion."""


def http_transport(url: str, payload: dict, headers: dict, timeout: float) -> dict:
    """POST JSON, return the decoded JSON response (urllib: no extra dependency)."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the user's endpoint
        return json.loads(response.read().decode("utf-8"))


def parse_verdict(text: str) -> Optional[bool]:
    """``yes`` -> True, ``no`` -> False (the first word, any case and punctuation), else None."""
    words = re.findall(r"[a-z]+", (text or "").lower())
    if not words:
        return None
    return {"yes": True, "no": False}.get(words[0])


@dataclass
class Verdict:
    consistent: Optional[bool]  # None: the reply did not start with yes or no
    reply: str


class Judge:
    def __init__(self, cfg: JudgeConfig, transport: Optional[Transport] = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self.transport = transport or http_transport
        self.sleep = sleep
        self.url = str(cfg.endpoint).rstrip("/") + "/chat/completions"

    def headers(self) -> dict:
        name = self.cfg.api_key_env
        key = os.environ.get(str(name)) if name else None
        return {"Authorization": f"Bearer {key}"} if key else {}

    def payload(self, reference: str, answer: str) -> dict:
        prompt = str(self.cfg.template).replace("{reference}", reference).replace("{answer}", answer)
        return {"model": str(self.cfg.model), "messages": [{"role": "user", "content": prompt}],
                "temperature": 0, "max_tokens": 4}

    def ask(self, reference: str, answer: str) -> Verdict:
        payload = self.payload(reference, answer)
        attempts = int(self.cfg.max_retries) + 1
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                response = self.transport(self.url, payload, self.headers(), float(self.cfg.timeout_s))
                reply = response["choices"][0]["message"]["content"]
                return Verdict(parse_verdict(reply), str(reply))
            except (KeyError, IndexError, TypeError) as err:
                raise JudgeError(f"{self.url} did not answer with a chat completion ({type(err).__name__}: {err}); "
                                 f"is eval.judge.endpoint an OpenAI-compatible .../v1 URL?") from None
            except urllib.error.HTTPError as err:
                if err.code < 500 and err.code != 429:  # a client error will not fix itself
                    raise JudgeError(f"{self.url}: HTTP {err.code} {err.reason} (check eval.judge.model and the key "
                                     f"in ${self.cfg.api_key_env})") from None
                last = err
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
                last = err
            if attempt + 1 < attempts:
                self.sleep(min(30.0, 2.0 ** attempt))
        raise JudgeError(f"{self.url} failed {attempts} times ({type(last).__name__}: {last}); check "
                         f"eval.judge.endpoint or run without the judge (eval.judge.enabled=false)")
