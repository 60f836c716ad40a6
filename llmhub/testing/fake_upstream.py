"""A deterministic fake of the OpenAI and Anthropic HTTP APIs, good enough for the official SDKs.

Run it standalone::

    python -m llmhub.testing.fake_upstream --port 18080 [--host 127.0.0.1] [--latency-ms 0] [--ttft-ms 0] [--tps 0]
        [--api-key KEY] [--demo] [--obfuscation]
    python -m llmhub.testing.fake_upstream --upstream east=18080 --upstream west=18082,latency_ms=50,fault=status=503

or in-process (tests; the ``fake_upstreams`` fixture starts several)::

    with FakeUpstream() as upstream:
        client = openai.OpenAI(base_url=upstream.base_url + "/v1", api_key="x", max_retries=0)

Several upstreams
    One process serves any number of listeners (``--upstream NAME=PORT[,latency_ms=MS][,ttft_ms=MS][,tps=N]
    [,fault=SPEC]``, repeated; ``fault=`` comes last; in-process ``FakeUpstreams([UpstreamSpec(...), ...])``),
    each with its own base latency (before the answer), time to first token (on top, before the first
    streamed piece or a whole non-streamed reply), tokens per second, and standing fault: what every request
    that names no fault itself gets. Faults are spelt ``status=503`` (or ``503``), ``status=429,retry_after=1``
    (or ``429:1``; a plain ``429`` says ``Retry-After: 2``; ``429:250ms`` says ``retry-after-ms: 250`` instead, as
    OpenAI's API may, and ``429:none`` no wait at all), ``cut_after=3`` (or ``cut-3``), ``context_length``
    (or ``context``), ``hang``, ``error-event``, and ``refuse``: the listener stops listening (connections are
    refused; those kept alive from before are dropped) until its fault is changed. Every spelling also works
    as a request's marker (``[[fault=status=429,retry_after=1]]``), where ``refuse`` drops that connection.
    ``POST /__control`` with a JSON object changes a listener at run time: ``fault`` (a spelling, or null to
    heal), ``models`` (a list of upstream model ids: the fault hits only requests for those, as when one
    model is down at a provider), ``latency_ms``, ``ttft_ms``, ``tps``, ``reset`` (counters to zero),
    ``accept_keys`` (keys accepted besides ``--api-key``: users' own keys), and
    ``upstream`` to act on another listener of the process by name (how a refusing one is healed over
    HTTP). ``GET /__stats`` (``?upstream=NAME`` for another) answers a listener's settings and the requests
    it served (in all, by path, by model); control requests and refused connections are not counted.
    Each recorded request (``requests``) keeps the SHA-256 of the key it came with (``key_sha256``), never
    the key, and says ``"closed_early": true`` once its client closed the connection before the reply's end (a
    stream llmhub cut, or gave up when its own client left). A key containing ``-refused``, ``-noaccess``,
    ``-nomodel`` or ``-noquota`` is answered as a provider answers such a key: 401 invalid_api_key, 403 no access,
    404 model_not_found (OpenAI's "does not exist or you do not have access to it", to an account without the
    model), 429 insufficient_quota.

Endpoints
    ``POST /v1/chat/completions`` (OpenAI, streaming or not), ``POST /v1/completions`` (OpenAI's legacy text
    completions, streaming or not: see ``text_completions``; Ollama's under ``/ollama/v1``, one string prompt),
    ``POST /v1/messages`` (Anthropic, streaming or not), ``POST /v1/messages/count_tokens`` (Anthropic's token
    counting: ``messages_count_tokens``), ``POST /v1/embeddings`` (OpenAI, see Embeddings below),
    ``POST /v1/moderations`` (OpenAI, see Moderation below), ``GET /v1/models`` and
    ``GET /v1/models/{id}`` (Anthropic shape when the request carries an ``anthropic-version`` header,
    OpenAI shape otherwise, which also lists ``fake-embedding-small``). Azure OpenAI's routes answer as OpenAI's: ``POST
    /openai/deployments/{deployment}/chat/completions`` and ``…/embeddings`` (the deployment is the model
    when the body names none), ``GET /openai/models``; each needs an ``api-version`` query parameter
    (else a 400, as Azure answers; one older than 2024-09-01-preview refuses ``max_completion_tokens`` with Azure's 400
    ``Unrecognized request argument supplied``, a deployment named ``fake-gpt-5`` refuses ``max_tokens`` as OpenAI's
    does) and takes the key in an ``api-key`` header. OpenAI's chat completions (and each route answered as them)
    refuse a ``strict`` function whose parameters do not close their object (``"additionalProperties": false``) with
    OpenAI's 400 ``invalid_function_parameters`` naming ``tools[N].function.parameters`` (since 7 December; only the
    schema's top level is checked). Mistral's, under ``/mistral``
    (``base_url`` ``…/mistral/v1``): ``POST /mistral/v1/chat/completions``, ``…/embeddings``, ``…/fim/completions``
    (Codestral's fill-in-the-middle: ``prompt`` and ``suffix``, answered as its chat completions), ``GET
    /mistral/v1/models``, answered as OpenAI's but strict as Mistral is: a field Mistral does not take
    (``stream_options``, ``max_completion_tokens``, ``seed``, ``logprobs``, ``user``, ``prompt_cache_retention``,
    embeddings' ``dimensions``, …; an assistant message's field other than ``role``, ``content``, ``tool_calls``
    and ``prefix``, such as another provider's ``reasoning_content`` or ``thinking_blocks``) is a 422 in Mistral's
    shape (``{"object": "error", "message": {"detail": [{"type": "extra_forbidden", "loc": ["body", NAME], …}]},
    …}``), and so is a content chunk of a type its messages have not (its ``ContentChunk``: text, image_url,
    document_url, reference, file, thinking, input_audio; a system message's text and thinking), such as OpenAI's
    ``refusal`` part (``union_tag_invalid``; since 7 December: until then taken), Mistral's own names are taken
    (``random_seed``, ``output_dimension``) and so is ``prompt_cache_key``, as Mistral's chat completions take it
    (since 7 December: until then a 422), and ``reasoning_effort`` and ``guardrails``, as its
    ``ChatCompletionRequest`` has them (since 7 December: until then a 422), an effort Mistral has not (its
    ``ReasoningEffort`` is ``none`` or ``high``) its 422 of a value outside the enum (``{"type": "enum", "loc":
    ["body", "reasoning_effort"], "msg": "Input should be 'none' or 'high'", …}``), a stream always reports its
    usage, on its last chunk, embeddings take at most 512 inputs a request (more: Mistral's 400 ``Too many inputs in
    request``), a tool call's id in the messages (a call's ``id``, a tool message's ``tool_call_id``) must be 9
    letters and digits (else Mistral's 400 ``Tool call id was … but must be a-z, A-Z, 0-9, with a length of 9.``,
    code 3280; since 6 December; the calls it makes have such ids, as Mistral's do, ``D681PevKs``: until 6 December
    OpenAI's ``call_…``), and a last message of the assistant's (a prefill) must say ``"prefix": true``
    (else Mistral's 400 ``Expected last role User or Tool (or Assistant with prefix True) …``); with it, the reply
    (streamed or whole) begins with the prefix itself, as Mistral's does (``[[prefix_echo=off]]``: it only continues
    it, as this fake did before 6 December). Ollama's, under ``/ollama``
    (``…/ollama/v1``: chat completions, embeddings, models), answered as OpenAI's but, as Ollama does, with one
    choice whatever ``n`` asked, no limit but ``max_tokens``, and a call to a tool given whatever ``tool_choice``
    says (a field it does not read, ``max_completion_tokens`` and ``tool_choice`` among them, is ignored), and a
    content part it does not read (any but text and image_url: a ``refusal``) its 400 ``invalid message format``
    (since 7 December: until then taken), and an image URL it does not decode (a data URL of a type but JPEG, PNG or
    WEBP, an http(s) URL) its 400 ``invalid image input`` (since 7 December). Google
    Gemini's (v1beta):
    ``POST /v1beta/models/{model}:generateContent``, ``…:streamGenerateContent?alt=sse`` (one token per
    ``data:`` event, usage on the last; ``generationConfig.candidateCount`` answers that many candidates, 1
    to 8, each with its ``index``, in every chunk, their tokens summed in ``candidatesTokenCount``;
    ``responseLogprobs: true`` gives each candidate a ``logprobsResult`` for its tokens in that response or chunk,
    ``chosenCandidates`` and, for ``logprobs: N``, N ``topCandidates`` a step, with OpenAI's values),
    ``…:batchEmbedContents`` (the same vectors as /v1/embeddings; no usage, as Gemini reports none; at
    most 100 requests a batch, more a 400 as Google answers), ``GET /v1beta/models``; the key in
    ``x-goog-api-key`` or ``?key=``,
    errors as ``{"error": {"code", "message", "status"}}`` (a 429's delay not in a ``Retry-After`` header but,
    as Google sends it, in a ``RetryInfo`` detail's ``retryDelay``); ``[[safety=response]]`` answers a SAFETY finish
    with no content, ``[[safety=prompt]]`` a ``promptFeedback.blockReason``. Control endpoints, which
    are neither counted nor logged: ``GET /_fake/stats``, ``POST /_fake/reset``, ``GET /_fake/requests``.

Replies
    To the last user message (the last ``user`` message that has text or images; Anthropic messages that
    only carry ``tool_result`` blocks do not count) the reply is ``"Echo: " + text`` where directives are
    removed and each image is rendered as ``[image]``. Directives are read from that same message, so in
    a tool round trip the original question's directives still apply to the follow-up. In priority order:

    * ``[[reply=some text]]`` replies exactly that text; ``[[words=N]]`` replies exactly N words from a
      fixed lorem-ipsum cycle;
    * ``[[then=some text]]`` in an earlier user message that an assistant message follows (OpenAI and
      Anthropic): the reply to the next turn is that text, unless that turn's own message says ``reply``
      or ``words`` (a conversation that goes on after a scripted first answer, e.g. a retry after a bad
      reply: ``[[reply=bad]] [[then=good]]``);
    * if the last message is a tool result (OpenAI ``role: tool``; Anthropic ``tool_result`` blocks) the
      reply is ``"Tool result: " + result text``;
    * if ``tools`` are given (and ``tool_choice`` is not ``none``) and the last message is a user message,
      the reply is a call to the first tool (or the one ``tool_choice`` names) whose arguments come from
      its JSON-schema properties: ``enum`` -> first value, string -> last user text, number/integer -> 42,
      boolean -> true, array -> [], object -> {}; ``[[tool_calls=N]]`` (OpenAI, Gemini and Cohere routes, N from 1 to 8)
      makes it N calls of that tool at once (ids distinct, arguments the same), as models that call tools in
      parallel do, whatever ``parallel_tool_calls`` asked (as Ollama and Gemini do); the legacy ``functions``
      (OpenAI routes, without ``tools``; ``function_call`` ``none`` or ``{"name": ...}`` as ``tool_choice``) are
      answered as OpenAI still answers them: one call, in the message's ``function_call`` (streamed: in
      ``delta.function_call``, its name first, then its arguments in pieces), finish reason ``function_call``;
    * otherwise the echo; or, in demo mode (``--demo``, ``FakeUpstream(demo=True)``, what `make run`
      starts), one of a few canned answers in Markdown (bold or a heading, a list, a fenced code block
      with a language tag) that show what a chat page can render: the first whose keywords the prompt
      contains (``code``/``python``/…, ``list``/``steps``/…, ``api``/``sdk``/…, ``hello``/``hi``/…),
      else one picked by the CRC-32 of the prompt, so the same prompt always gets the same answer.

    Other directives: ``[[tps=N]]`` tokens per second (also paces non-streamed replies: the response is
    held back by ``tokens / tps`` seconds), ``[[latency=MS]]`` delay before answering (overrides
    ``--latency-ms``), ``[[ttft=MS]]`` time to first token (overrides ``--ttft-ms``), ``[[cache=N]]`` N cached
    prompt tokens, ``[[cache_write=N]]`` (Anthropic only) N prompt tokens written to the cache,
    ``[[cache_write_1h=N]]`` (Anthropic only) N of those written to the 1-hour cache, ``[[web_search=N]]``
    (Anthropic only) reports N web searches (``usage.server_tool_use.web_search_requests``, streamed in
    ``message_delta``'s usage, 0 in ``message_start``'s), each a ``server_tool_use`` block and its
    ``web_search_tool_result`` before the reply (streamed before the reply's block), ``[[fault=NAME]]`` see below.
    ``[[omit=NAME,...]]`` (OpenAI only) leaves fields out of the response and of every chunk, as some
    OpenAI-compatible servers do: ``id``, ``object``, ``created``, ``model`` (top level), ``index``,
    ``logprobs``, ``finish_reason`` (each choice; in a chunk only where it is null), ``role``, ``content``,
    ``refusal`` (each message or delta), ``tool_calls.type``, ``tool_calls.index``, ``usage.total_tokens``.
    ``[[nulls=NAME,...]]`` (OpenAI only) says null for each of ``role``, ``tool_calls`` and ``function_call`` named
    that a delta (streamed: every chunk's) or a message lacks, as vLLM, LM Studio, llama.cpp and some OpenRouter
    routes say none.
    ``[[arguments=object]]`` (OpenAI only) sends a tool call's (or a legacy function call's) ``arguments`` as the JSON
    object itself, not its text, as Hugging Face TGI and llama.cpp's server with ``--tool-args-object`` do; streamed,
    the whole object in one piece after the call's opening.
    ``[[logprob=NaN]]`` (or ``Infinity``, ``-Infinity``; OpenAI's chat and text completions) makes every logprob of
    the reply (each token's and its alternatives') that number, written as Python's JSON writes it, which is no JSON
    (vLLM's logprob of a token it could not have chosen is ``-Infinity``).
    ``[[tool_calls_shape=object]]`` (OpenAI only, streamed) sends each delta's ``tool_calls`` as the one call piece
    itself, an object, not an array of it, as older versions of Hugging Face TGI's OpenAI-compatible route stream it
    (``"tool_calls": {"index": 0, "id": …, "type": "function", "function": {…}}``).
    ``[[thinking=some text]]`` (Anthropic only, in a request whose ``thinking`` is enabled: ``{"type": "enabled",
    "budget_tokens": N}`` or ``{"type": "adaptive"}``) puts a ``thinking`` block of that text, with a ``signature``,
    before the reply, as extended thinking does (streamed: ``thinking_delta`` events in pieces, then a
    ``signature_delta``, the reply's block at index 1); its words are not counted in ``output_tokens``, but, as
    Anthropic's, they count against ``max_tokens``: the thinking is cut at ``budget_tokens`` and the reply gets
    what is left of ``max_tokens`` (a thinking of N words leaves ``max_tokens - N`` to the reply). The
    Anthropic routes refuse what Anthropic refuses with thinking (``_validate_anthropic_thinking``), more than
    four blocks with ``cache_control`` (tools, system and turns together), and a ``cache_control`` of ``ttl`` "1h"
    after one of the 5-minute TTL (``"5m"`` or none) in that order (``_anthropic_cache_ttl_misordered``), with
    Anthropic's 400 and words. On the
    Gemini routes, unless ``thinkingBudget`` is 0, its words are billed as ``thoughtsTokenCount``, and with
    ``includeThoughts`` the text comes before the answer as a ``thought`` part (streamed: in pieces of its own);
    a ``thinkingBudget`` of 0 for a Pro model since 2.5 (``gemini-2.5-pro…``, ``gemini-3-pro…``), which only thinks,
    is Google's 400 INVALID_ARGUMENT, "Budget 0 is invalid. This model only works in thinking mode."
    ``[[reasoning=some text]]`` (OpenAI only) answers that text as the model's reasoning before its reply, as
    OpenAI-compatible servers of reasoning models do: in the message's ``reasoning_content`` (DeepSeek, vLLM), or
    with ``[[reasoning_field=reasoning]]`` in its ``reasoning`` (OpenRouter, Ollama); streamed in that field of the
    deltas, in pieces, before the reply's first. Its words count in ``completion_tokens`` (and in
    ``completion_tokens_details.reasoning_tokens``), as those servers bill them. Under ``/mistral`` it is spelt
    as Mistral's reasoning models write it: ``content`` a list of chunks, a ``thinking`` chunk (its text in a list
    of ``text`` chunks) then the reply's ``text`` chunk; streamed, each delta's ``content`` such a list.
    ``[[preamble=some text]]`` (OpenAI only) puts that text in the message's ``content`` before a tool call or a
    legacy ``function_call`` (streamed first, then the call opens), as models that say what they are about to
    do; its words count as the reply's. A request that ends in an assistant message (a prefill) that begins the
    preamble is answered as a model continues one: the rest of the preamble, then the call.
    ``[[stop_reason=vllm]]`` (OpenAI only) gives each choice, and each streamed finish, vLLM's ``stop_reason`` beside
    its ``finish_reason``: the stop string the reply was cut at, else null.
    ``[[project_tier=NAME]]`` (OpenAI's chat completions) is the project's default service tier (``priority``,
    ``flex``): a request asking ``auto`` or no tier is answered as served at it, as OpenAI answers for a project
    whose default is Priority processing; a request asking ``default``, ``flex`` or ``priority`` is answered as
    served at that tier, whole and in every chunk (``service_tier``), and without either at ``default``.
    ``[[served_tier=NAME]]`` answers as served at NAME whatever the request asked, as an OpenAI-compatible server
    may (OpenAI itself serves a request asking ``default`` at default).
    ``[[usage=none]]`` (OpenAI and Gemini) reports no usage: none in the response, no usage chunk whatever
    ``stream_options`` asked, as some OpenAI-compatible servers do (Gemini: no ``usageMetadata``).
    ``[[raw=BASE64]]`` (OpenAI's chat completions and text completions) answers exactly the bytes the URL-safe
    base64 decodes to, with a 200: a stream's whole body (``text/event-stream``: its ``data:`` and ``event:`` lines
    as given, no ``[DONE]`` added), or a whole reply's (``application/json``, whether it is JSON or not), so that a
    test can send any shape an upstream might, odd or hostile (``raw_directive`` spells the marker);
    ``[[raw_encoding=gzip]]`` beside it (or beside ``[[raw_cohere=...]]``) says the body is so encoded
    (``Content-Encoding``), whatever it holds.
    ``[[stream=ignored]]`` (OpenAI's chat completions and text completions) answers a stream request as if
    ``stream`` were false: the whole reply (or the raw bytes) as ``application/json``, as vLLM, Ollama and proxy
    set-ups that ignore it do.
    ``[[raw_anthropic=BASE64]]``, ``[[raw_gemini=BASE64]]`` and ``[[raw_cohere=BASE64]]`` do the same on
    Anthropic's Messages, Gemini's generateContent and Cohere's chat (markers of their own, so that a request
    falling over from an OpenAI deployment to another protocol's is answered there as usual).
    ``[[obfuscation=on]]`` (OpenAI only, streamed) pads every chunk with a top-level ``obfuscation`` string of
    1 to 16 random letters and digits, last in the chunk, as OpenAI does to even out the chunks' sizes
    (``--obfuscation``: every stream, as OpenAI's own are, unless ``[[obfuscation=off]]``);
    ``stream_options.include_obfuscation: false`` turns it off, as it does OpenAI's.
    ``[[url_citation=URL]]`` (OpenAI's routes) cites URL for the whole text reply, as OpenAI's search models do: one
    ``url_citation`` in the message's ``annotations`` (``start_index`` 0, ``end_index`` the text's length, ``title``
    ``Fake source``); streamed, in a delta of its own after the text's. A request with ``web_search_options``
    (OpenAI's routes) is answered as a search model answers it, citing ``https://search.example/1`` so (a search
    OpenAI bills per call and reports in no usage), unless ``[[url_citation=URL]]`` names another source; so is any
    request to a model named as OpenAI's search models are (``gpt-4o-search-preview``, ``gpt-4o-mini-search-preview``,
    ``gpt-5-search-api``, dated or not), which search before every answer, asked or not.

    ``max_tokens`` / ``max_completion_tokens`` truncate the reply to that many tokens (finish reason
    ``length`` / ``max_tokens``); past what the model writes at most they are refused with the provider's 400
    (OpenAI's ``max_tokens is too large`` for ``fake-gpt-4o``/``-mini``, 16384, and ``fake-o3-mini``, 100000:
    ``OPENAI_MAX_OUTPUT_TOKENS``; Anthropic's past 64000 for every Claude). ``fake-gpt-5`` (not listed) takes its limit
    as OpenAI's newest models do, only as ``max_completion_tokens``: ``max_tokens`` is OpenAI's 400
    ``unsupported_parameter`` (``OPENAI_MAX_TOKENS_REFUSED``). ``stop`` / ``stop_sequences`` cut the
    reply before the first occurrence (finish reason ``stop`` / ``stop_sequence``) when that comes no later than the
    length cut. An Anthropic request whose last message is an assistant prefill ending in whitespace is a 400, as
    it is Anthropic's.

Token counting (exact rule)
    A "token" is a whitespace-separated word together with the whitespace before it, so the streamed
    pieces concatenate back to the reply. ``words(s) = len(s.split())``.

    * prompt tokens = sum over messages of ``3 + words(text) + 85 * images``, where an Anthropic non-empty
      ``system`` prompt counts as one more message. ``text`` is every text part, tool-result content,
      assistant tool-call arguments (OpenAI ``function.arguments``; Anthropic ``json.dumps(input)``) and
      thinking text in the message. Tool definitions are not counted. Directives are counted as the words
      they are made of (``[[cache=4]]`` is one word, ``[[reply=hi there]]`` two). With ``[[count=bytes]]`` in the
      last user message (OpenAI's and Anthropic's chat), ``words(text)`` is the text's UTF-8 bytes instead, as for
      embeddings (below): what a byte-level BPE tokenizer counts at most, which a CJK or emoji prompt comes close to.
    * completion tokens = number of tokens in the reply text, or ``words(name + " " + arguments_json)``
      for a tool call (``arguments_json`` is ``json.dumps(arguments)``), times ``n`` for OpenAI.
    * ``[[cache=N]]`` reports ``c = min(N, prompt tokens)`` cached tokens. As with the real APIs, OpenAI's
      ``prompt_tokens`` includes them (``prompt_tokens_details.cached_tokens = c``) whereas Anthropic's
      ``input_tokens`` excludes them (``input_tokens = prompt - c - w``, ``cache_read_input_tokens = c``,
      ``cache_creation_input_tokens = w``).
    * ``[[cache_write=N]]`` (Anthropic only) reports ``w = min(N, prompt tokens - c)`` tokens written to the
      cache, in ``message_start`` when streamed, as Anthropic does: ``cache_creation_input_tokens = w``, which
      ``input_tokens`` excludes as it excludes cached reads. With ``w > 0`` the usage also says which cache
      they went to: ``cache_creation = {ephemeral_5m_input_tokens: w - h, ephemeral_1h_input_tokens: h}``,
      where ``[[cache_write_1h=N]]`` gives ``h = min(N, w)`` (0 without it).

Embeddings
    One vector per input (a string, a list of strings, a token array or a list of token arrays), derived
    from the SHA-256 of the input (its text, or its tokens joined by spaces), so the same input always gets
    the same vector: ``dimensions`` numbers (default 256), each a float32, the whole of unit length.
    ``encoding_format: base64`` answers each as the base64 of its little-endian float32 bytes, as OpenAI
    does. ``usage.prompt_tokens`` (= ``total_tokens``) is the sum of ``words(text)`` of the strings and
    the lengths of the token arrays; with ``[[count=bytes]]``, the strings' UTF-8 bytes instead (the most a
    byte-level BPE tokenizer counts: a text of emoji or of rare CJK characters comes close to it). Directives are
    read from the string inputs: ``[[fault=NAME]]`` and
    ``[[latency=MS]]`` as for chat, ``[[usage=none]]`` leaves ``usage`` out, ``[[encoding=float]]``
    answers floats whatever ``encoding_format`` asked (as servers that ignore the field do),
    ``[[order=reversed]]`` lists the embeddings last input first, each with its own ``index`` (as servers
    that embed a batch in parallel may), ``[[omit=index]]`` leaves every ``index`` out (in input order), and
    ``[[vectors=N]]`` answers the first N inputs' embeddings only (as a server that drops inputs it cannot embed);
    ``[[raw=BASE64]]`` answers exactly those bytes, as on chat completions (a shape some server sends).
    Gemini's ``batchEmbedContents`` gives a request naming a ``taskType`` another vector (SHA-256 of the text,
    NUL, the task type), and Cohere's ``embed`` an ``input_type`` other than ``search_document`` the same way:
    a query is embedded apart from the documents, as these providers do.

Moderation
    ``POST /v1/moderations`` answers OpenAI's shape, ``{"id", "model", "results": [{"flagged",
    "categories", "category_scores"}]}``, one result per input (a string, a list of strings, or text parts).
    An input is flagged in the categories it names with markers ``[flag:CATEGORY]`` (single brackets, so a
    marker survives the echo and ``[[reply=...]]`` into a chat reply: the same text flags a prompt and the
    reply that repeats it), e.g. ``[flag:violence]`` or ``[flag:self-harm/intent]``; only OpenAI's category
    names count (``MODERATION_CATEGORIES``). A flagged category scores 0.99, the others 0.0001. As OpenAI's, it
    reads only the start of a long input (``MODERATION_READ_CHARS``, its first 16,000 characters, about 4,000
    tokens of English), so a marker past that in one input is not seen: OpenAI's moderation models truncate an
    input (its models page: past 32,768 tokens), and omni-moderation was reported (Wei-Shaw/sub2api#5214) to
    answer any input past about 4,000 tokens with the scores of an empty one. Every request is in ``requests``
    with its body, so a test counts what it was sent. It is counted
    in ``/__stats`` like every path; the faults apply as for chat (a ``[[fault=...]]`` or ``[[latency=MS]]``
    in the input, the ``x-fake-fault`` header, or a standing fault, which ``/__control {"fault": "503",
    "models": ["omni-moderation-latest"]}`` limits to the moderation model so that chat keeps working). OpenAI's
    moderation answers 429 at low usage tiers (it is limited by the token): ``[[fault=429:0.2]]
    [[fault_times=1]]`` in the input is one such 429 (``Retry-After: 0.2``), then the answer; ``429:200ms`` says
    the wait in ``retry-after-ms``, ``429:none`` says none, and a standing ``429:...`` limited to the moderation
    model answers every call so.

Faults
    Chosen by the ``x-fake-fault`` header, else the ``[[fault=NAME]]`` directive, else a model named
    ``fault-NAME``. Any 4xx/5xx status code (e.g. ``400``, ``401``, ``429`` with ``Retry-After: 2``,
    ``500``, ``503``, ``529``) answers that status with a provider-shaped error body; ``context`` is a 400
    context-length error; ``hang`` never answers; ``cut-N`` streams N content chunks and then aborts the
    connection (non-streamed: aborts without answering); ``error-event`` streams two content chunks and
    then an in-stream error (non-streamed: a 500); ``drop-after-usage`` (Anthropic's Messages) streams the whole
    reply and its ``message_delta`` (the final usage), then aborts before ``message_stop`` (non-streamed: aborts
    without answering; other protocols' streams are not cut). Unknown names are a 400. Without any of these, the
    listener's standing fault applies (see Several upstreams, which also lists the other spellings).
    ``[[fault_times=N]]`` beside a ``[[fault=NAME]]`` marker makes that fault a blip: it hits the first N
    requests carrying the same directives, and later ones are answered (a retry that succeeds). The count is
    the listener's, and goes back to zero with its counters (``reset``).

Keys
    With ``api_key`` set, requests must carry ``Authorization: Bearer KEY`` or ``x-api-key: KEY``
    (either is accepted on every endpoint; note that the anthropic SDK sends its ``api_key`` as a bearer
    token) or get a 401 in the provider's format.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import contextlib
import contextvars
import copy
import hashlib
import json
import logging
import math
import random
import re
import string
import sys
import threading
import time
import uuid
import zlib
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Literal, NoReturn, Self

from aiohttp import web

__all__ = [
    "EMBEDDING_MODELS",
    "MODELS",
    "MODERATION_CATEGORIES",
    "MODERATION_READ_CHARS",
    "FakeUpstream",
    "FakeUpstreams",
    "UpstreamHandle",
    "UpstreamSpec",
    "count_words",
    "demo_answer",
    "demo_thought",
    "fault_canonical",
    "main",
    "raw_directive",
    "split_tokens",
]

logger = logging.getLogger(__name__)

MODELS: tuple[tuple[str, str], ...] = (
    ("fake-gpt-4o-mini", "Fake GPT-4o mini"),
    ("fake-gpt-4o", "Fake GPT-4o"),
    ("fake-o3-mini", "Fake o3-mini"),
    ("fake-claude-haiku", "Fake Claude Haiku"),
    ("fake-claude-sonnet", "Fake Claude Sonnet"),
)
# Listed by OpenAI's model list as well (which names embedding models, Anthropic's has none), so that a
# health check of an embedding deployment finds its upstream id: the demo's demo-embedding-small.
# /v1/embeddings itself answers for any model name.
EMBEDDING_MODELS: tuple[tuple[str, str], ...] = (("fake-embedding-small", "Fake embedding small"),)
_MODELS_CREATED = 1735689600  # 2025-01-01T00:00:00Z; fixed so listings are byte-for-byte stable
_MODELS_CREATED_RFC3339 = "2025-01-01T00:00:00Z"

_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore "
    "magna aliqua"
).split()
_IMAGE_TOKENS = 85
_MESSAGE_OVERHEAD = 3
_OPENAI_CONTEXT_WINDOW = 128_000
_ANTHROPIC_CONTEXT_WINDOW = 200_000
# What every fake Claude writes at most (its model listing's ``max_tokens``): past it, ``max_tokens`` is refused.
ANTHROPIC_MAX_OUTPUT_TOKENS = 64_000
# What the fake OpenAI models write at most, as their namesakes do (OpenAI's list says nothing of it): past it, a
# chat completion's ``max_tokens`` or ``max_completion_tokens`` is refused. Other model ids take any limit.
OPENAI_MAX_OUTPUT_TOKENS = {"fake-gpt-4o-mini": 16_384, "fake-gpt-4o": 16_384, "fake-o3-mini": 100_000}
# Model ids answered as OpenAI's newest models are (gpt-5, the o-series), which take the output limit only as
# ``max_completion_tokens``: a chat completion's ``max_tokens`` is OpenAI's 400 ``unsupported_parameter``. Not listed.
OPENAI_MAX_TOKENS_REFUSED = frozenset({"fake-gpt-5"})
# Azure OpenAI's api-versions are dated (``2024-10-21``, ``2024-09-01-preview``); ``max_completion_tokens`` came with
# 2024-09-01-preview (its o-series and gpt-5 deployments take no other limit), and every later one, GA or preview,
# has it. The v1 API's undated ``preview`` and ``latest`` are newer still.
AZURE_MAX_COMPLETION_TOKENS_SINCE = "2024-09-01"
# A chat completion's ``service_tier`` came with 2025-10-01-preview (Azure's priority processing); an older
# api-version refuses it as an argument it does not know. A deployment's own tier is ``[[project_tier=NAME]]``, as
# OpenAI's project's.
AZURE_SERVICE_TIER_SINCE = "2025-10-01"
# Set while an Azure route answers a request that set no ``service_tier``: Azure's reply says the tier it served only
# when the request set one (its priority-processing page), so the reply says none (``_served_tier``).
_TIER_UNSAID: contextvars.ContextVar[bool] = contextvars.ContextVar("tier_unsaid", default=False)
_REQUEST_LOG_SIZE = 100
_SHUTDOWN_TIMEOUT = 0.5
_ERROR_EVENT_CHUNKS = 2
_EMBEDDING_DIMENSIONS = 256
GEMINI_EMBED_BATCH_LIMIT = 100  # batchEmbedContents refuses more requests in one batch

# Demo mode's answers: short enough for a few turns on the Free plan's 1,000 tokens a day, and each
# with something for the chat page to render (emphasis, a list, a highlighted code block).
_DEMO_ANSWERS: dict[str, str] = {
    "code": """Here is a small, self-contained **Python** example:

```python
from collections import Counter


def top_words(text: str, n: int = 3) -> list[tuple[str, int]]:
    \"\"\"The n most frequent words, most frequent first.\"\"\"
    return Counter(text.lower().split()).most_common(n)


print(top_words("the cat and the hat and the bat"))
```

How it works:

1. `text.lower().split()` breaks the text into words.
2. `Counter` counts how often each word occurs.
3. `most_common(n)` keeps the `n` largest counts.

Running it prints `[('the', 3), ('and', 2), ('cat', 1)]`.""",
    "list": """## Five ways to get better answers from a model

1. **Say who the answer is for**: "explain to a new engineer" beats "explain".
2. **Show an example** of the output you want.
3. **Ask for a format**: a table, a list or JSON.
4. **Split big tasks** into steps and check each one.
5. **Follow up** instead of starting over.

A prompt that does most of that:

```markdown
You review a pull request for a new engineer.
List at most three problems, most important first, each with a one-line fix.
```""",
    "api": """### Calling this model from code

Every model on this page is also served at `/v1/` in OpenAI's format, so the official SDK works
unchanged:

```python
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="sk-llmhub-...")
reply = client.chat.completions.create(
    model="demo-gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}]
)
print(reply.choices[0].message.content)
```

- Create the key at **/keys/**: its secret is shown once.
- Every call is priced and written to the ledger: see **/usage/**.""",
    "hello": """**Hello!** I am the demo model of llmhub: a fake provider running on this machine, so nothing you
type leaves it or costs money.

What this page can show you:

- replies streamed *token by token*, with a stop button;
- Markdown: headings, **bold**, lists and `inline code`;
- highlighted code blocks:

```python
print("Hello from llmhub!")
```

To steer me, put a marker in your message: `[[words=50]]` for fifty words, `[[reply=any text]]`
for exactly that text.""",
}
# The first entry whose keywords occur in the prompt (as words) chooses the answer.
_DEMO_KEYWORDS: tuple[tuple[str, frozenset[str]], ...] = (
    ("code", frozenset({"code", "python", "function", "script", "program", "snippet", "bug", "regex", "sql"})),
    ("list", frozenset({"list", "steps", "ideas", "tips", "plan", "checklist", "ways"})),
    ("api", frozenset({"api", "sdk", "openai", "curl", "key", "keys", "endpoint"})),
    ("hello", frozenset({"hello", "hi", "hey", "help", "who", "demo"})),
)

# OpenAI's moderation categories (omni-moderation), in its order.
MODERATION_CATEGORIES: tuple[str, ...] = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
# How much of each input ``/v1/moderations`` reads (see Moderation in the module docstring).
MODERATION_READ_CHARS = 16_000
_FLAG_RE = re.compile(r"\[flag:([a-z/-]+)\]")
_DIRECTIVE_RE = re.compile(r"\s*\[\[([a-z][a-z0-9_]*)=(.*?)\]\]")
_TOKEN_RE = re.compile(r"\s*\S+")
_MASKED_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key", "api-key"})
_BODY_KEY: web.RequestKey[Any] = web.RequestKey("fake_body")
_LOG_ENTRY_KEY: web.RequestKey[dict[str, Any]] = web.RequestKey("fake_log_entry")
# Set on a request whose stream reports its usage on its last chunk, unasked (Mistral's).
_USAGE_ON_FINISH_KEY: web.RequestKey[bool] = web.RequestKey("fake_usage_on_finish")
# Mistral's prefix (a last assistant message marked ``"prefix": true``), which its reply begins with.
_PREFIX_ECHO_KEY: web.RequestKey[str] = web.RequestKey("fake_prefix_echo")

Provider = Literal["openai", "anthropic", "gemini"]
Finish = Literal["stop", "stop_sequence", "length", "tool"]

_OPENAI_FINISH: dict[str, str] = {"stop": "stop", "stop_sequence": "stop", "length": "length", "tool": "tool_calls"}


def _openai_finish(reply: _Reply) -> str:
    return "function_call" if reply.legacy_function else _OPENAI_FINISH[reply.finish]


_ANTHROPIC_FINISH: dict[str, str] = {
    "stop": "end_turn",
    "stop_sequence": "stop_sequence",
    "length": "max_tokens",
    "tool": "tool_use",
}


_TOP_FIELDS = frozenset({"id", "object", "created", "model"})
_CHOICE_FIELDS = frozenset({"index", "logprobs", "finish_reason"})
_MESSAGE_FIELDS = frozenset({"role", "content", "refusal"})


def _omitted(data: dict[str, Any], names: frozenset[str], *, chunk: bool = False) -> dict[str, Any]:
    """``data`` without the fields ``[[omit=...]]`` names (see the module docstring)."""
    if not names:
        return data
    data = copy.deepcopy(data)
    for name in names & _TOP_FIELDS:
        data.pop(name, None)
    for choice in data.get("choices") or ():
        for name in names & _CHOICE_FIELDS:
            if not (chunk and name == "finish_reason" and choice.get(name) is not None):
                choice.pop(name, None)
        message = choice.get("delta" if chunk else "message") or {}
        for name in names & _MESSAGE_FIELDS:
            message.pop(name, None)
        for call in message.get("tool_calls") or ():
            for name in names:
                if name.startswith("tool_calls."):
                    call.pop(name.removeprefix("tool_calls."), None)
    if "usage.total_tokens" in names and isinstance(data.get("usage"), dict):
        data["usage"].pop("total_tokens", None)
    return data


_NULLABLE_FIELDS = frozenset({"role", "tool_calls", "function_call"})


def _nulled(data: dict[str, Any], names: frozenset[str], *, chunk: bool = False) -> dict[str, Any]:
    """``data`` with null for each field ``[[nulls=...]]`` names that a delta or message lacks (module docstring)."""
    if not names & _NULLABLE_FIELDS:
        return data
    data = copy.deepcopy(data)
    for choice in data.get("choices") or ():
        message = choice.get("delta" if chunk else "message")
        if isinstance(message, dict):
            for name in names & _NULLABLE_FIELDS:
                message.setdefault(name, None)
    return data


def count_words(text: str) -> int:
    return len(text.split())


def _utf8_bytes(text: str) -> int:
    # The most tokens a byte-level BPE tokenizer (OpenAI's, and most others') can make of a text: one a byte.
    return len(text.encode("utf-8", "surrogatepass"))


def split_tokens(text: str) -> list[str]:
    """Split into words with their leading whitespace; trailing whitespace sticks to the last token."""
    tokens = _TOKEN_RE.findall(text)
    if tokens:
        tail = text[sum(len(token) for token in tokens) :]
        tokens[-1] += tail
    return tokens


_ALPHANUMERIC = string.ascii_letters + string.digits
_OBFUSCATION_CHARACTERS = _ALPHANUMERIC
# Padding, not a secret: a pseudo-random generator of its own. ``secrets`` asked the kernel for every
# character, which made the fake provider, sharing the benchmark's two cores, slower than the server it feeds.
_PADDING_RANDOM = random.Random()  # noqa: S311


def _new_id(prefix: str, length: int = 24) -> str:
    return prefix + uuid.uuid4().hex[:length]


def _presented_key(request: web.Request) -> str:
    """The API key a request carries, however its protocol sends it ("" for none)."""
    authorization = request.headers.get("authorization") or ""
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return (
        request.headers.get("x-api-key")
        or request.headers.get("x-goog-api-key")
        or request.headers.get("api-key")
        or request.query.get("key")
        or ""
    )


def key_digest(key: str) -> str:
    """What a recorded request keeps of its key (``key_sha256``): compare with this, never the key."""
    return hashlib.sha256(key.encode()).hexdigest() if key else ""


# Keys that a real provider would refuse, by a marker in the key: what a key's live validation and a call
# on a user's own key meet. (status, message, error type, code), as the provider words it.
_KEY_REFUSALS: tuple[tuple[str, tuple[int, str, str | None, str | None]], ...] = (
    ("-refused", (401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")),
    ("-noaccess", (403, "You do not have access to this model or project.", "permission_error", "model_not_found")),
    (
        "-nomodel",
        (404, "The model does not exist or you do not have access to it.", "invalid_request_error", "model_not_found"),
    ),
    (
        "-noquota",
        (
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        ),
    ),
)


_ANTHROPIC_NO_CREDIT = (
    "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or "
    "purchase credits."
)


def _key_refusal(key: str) -> tuple[int, str, str | None, str | None] | None:
    for marker, refusal in _KEY_REFUSALS:
        if marker in key:
            return refusal
    return None


def _mask(value: str) -> str:
    return "*" * max(len(value) - 4, 0) + value[-4:] if len(value) > 4 else "*" * len(value)


# ``[[logprob=NaN]]`` (``Infinity``, ``-Infinity``): the number every logprob of this request's reply is, as the
# handler that read the marker set it (module docstring).
_LOGPROB_SAID: contextvars.ContextVar[float | None] = contextvars.ContextVar("logprob_said", default=None)
_LOGPROBS_JSON_HAS_NOT = frozenset({"NaN", "Infinity", "-Infinity"})


def _logprob_said(directives: dict[str, str]) -> None:
    """``[[logprob=...]]``: a number JSON has not, which Python's JSON writes as it is (vLLM's logprob of a token
    it could not have chosen, ``-Infinity``)."""
    said = directives.get("logprob")
    _LOGPROB_SAID.set(float(said) if said in _LOGPROBS_JSON_HAS_NOT else None)


def _logprob(token: str) -> float:
    said = _LOGPROB_SAID.get()
    if said is not None:
        return said
    return -round((zlib.crc32(token.encode()) % 2000) / 1000, 3)


def _logprob_entry(token: str, top: int) -> dict[str, Any]:
    alternatives = [
        {"token": token, "logprob": _logprob(token), "bytes": list(token.encode())},
        *(
            {"token": f" alt{i}", "logprob": _logprob(token) - i, "bytes": list(f" alt{i}".encode())}
            for i in range(1, top)
        ),
    ]
    return {
        "token": token,
        "logprob": _logprob(token),
        "bytes": list(token.encode()),
        "top_logprobs": alternatives[:top],
    }


def _gemini_logprobs(tokens: list[str], top: int) -> dict[str, Any]:
    """A candidate's ``logprobsResult``, as Gemini answers ``responseLogprobs``: the token chosen at each step
    and, when ``logprobs`` asked for ``top`` of them, the most likely ones there (the chosen first), with the
    same values as OpenAI's (``_logprob_entry``)."""

    def candidate(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "tokenId": zlib.crc32(token.encode()) % 256_000, "logProbability": logprob}

    result: dict[str, Any] = {
        "chosenCandidates": [candidate(token, _logprob(token)) for token in tokens],
        "logProbabilitySum": round(sum(_logprob(token) for token in tokens), 3),
    }
    if top:
        result["topCandidates"] = [
            {
                "candidates": [
                    candidate(entry["token"], entry["logprob"]) for entry in _logprob_entry(token, top)["top_logprobs"]
                ]
            }
            for token in tokens
        ]
    return result


# The fields of a Messages request that Anthropic's token counting does not take (they count no input).
_NOT_COUNTED = frozenset(
    {"max_tokens", "stream", "temperature", "top_p", "top_k", "stop_sequences", "metadata", "service_tier"}
)


# The signature of a ``thinking`` block (Anthropic's is an opaque, encrypted check of the thinking).
THINKING_SIGNATURE = "ZmFrZS10aGlua2luZy1zaWduYXR1cmU="


def demo_thought(prompt: str) -> str:
    """Demo mode's thinking, when a request enables it without a ``[[thinking=TEXT]]``: what the chat page's
    Reasoning block shows under `make run` (a demo model has no mind to show, so it says what it does)."""
    asked = " ".join(prompt.split()[:12]) or "nothing"
    return (
        f'The user wrote: "{asked}". I am the demo model of llmhub, a fake provider on this machine, so I do not '
        "really think: I pick the canned answer whose keywords match the message, and stream it a word at a time. "
        "This thought is what a reasoning model's would look like, shown apart from the answer."
    )


def _anthropic_thinking(
    body: dict[str, Any], directives: dict[str, str], *, demo_prompt: str | None = None
) -> str | None:
    """The text of the ``thinking`` block a ``[[thinking=TEXT]]`` asks for (in demo mode, ``demo_prompt`` given,
    ``demo_thought``'s without one), when the request enables thinking: cut at its ``budget_tokens``, where Claude
    stops thinking."""
    setting = body.get("thinking")
    if not isinstance(setting, dict) or setting.get("type") not in ("enabled", "adaptive"):
        return None
    thinking = directives.get("thinking") or None
    if thinking is None and demo_prompt is not None:
        thinking = demo_thought(demo_prompt)
    budget = setting.get("budget_tokens")
    if thinking is not None and isinstance(budget, int) and not isinstance(budget, bool):
        tokens = split_tokens(thinking)
        if len(tokens) > budget:
            thinking = "".join(tokens[:budget])
    return thinking


def _gemini_thought(config: dict[str, Any], directives: dict[str, str]) -> str | None:
    """The thinking a ``[[thinking=TEXT]]`` asks of a Gemini model, unless its ``thinkingBudget`` is 0 (thinking
    off). Its words are billed as ``thoughtsTokenCount``; the text comes back, as ``thought`` parts, only when
    ``includeThoughts`` asks for it, as Gemini returns its thought summaries."""
    thinking = config.get("thinkingConfig") if isinstance(config.get("thinkingConfig"), dict) else {}
    # google-genai sends these fields in the proto's spelling or the JSON one; Google reads both.
    if thinking.get("thinkingBudget", thinking.get("thinking_budget")) == 0:
        return None
    return directives.get("thinking") or None


def _gemini_includes_thoughts(config: dict[str, Any]) -> bool:
    thinking = config.get("thinkingConfig") if isinstance(config.get("thinkingConfig"), dict) else {}
    return thinking.get("includeThoughts", thinking.get("include_thoughts")) is True


@dataclass(frozen=True)
class _OpenAILead:
    """What an OpenAI-shaped answer says before its reply: the model's reasoning (``[[reasoning=TEXT]]``, in the
    ``field`` ``[[reasoning_field=NAME]]`` names; ``content``: Mistral's ``thinking`` chunks) and, before a tool or
    function call, its text (``[[preamble=TEXT]]``)."""

    reasoning: str | None = None
    field: str = "reasoning_content"
    preamble: str | None = None

    @classmethod
    def of(cls, conv: _Conversation, reply: _Reply, *, mistral: bool = False) -> _OpenAILead:
        directives = conv.directives
        field = "reasoning" if directives.get("reasoning_field") == "reasoning" else "reasoning_content"
        if mistral:
            field = "content"
        preamble = None
        if reply.tool_name is not None:
            continued = _preamble_continued(conv)
            preamble = (directives.get("preamble") if continued is None else continued) or None
        return cls(directives.get("reasoning") or None, field, preamble)

    @property
    def present(self) -> bool:
        return self.reasoning is not None or self.preamble is not None

    @property
    def tokens(self) -> int:
        return count_words(self.reasoning or "") + len(split_tokens(self.preamble or ""))


def _mistral_chunks(thinking: str, text: str | None) -> list[dict[str, Any]]:
    """A message's (or a delta's) ``content`` as Mistral's reasoning models write it: a ``thinking`` chunk, then
    the text's."""
    chunks: list[dict[str, Any]] = [{"type": "thinking", "thinking": [{"type": "text", "text": thinking}]}]
    if text is not None:
        chunks.append({"type": "text", "text": text})
    return chunks


def _preamble_continued(conv: _Conversation) -> str | None:
    """What is left of the ``[[preamble=TEXT]]`` a request's prefill (its last, assistant message) begins; None
    when it asks for no such continuation."""
    preamble = conv.directives.get("preamble")
    if not preamble or not conv.prefill or not preamble.startswith(conv.prefill):
        return None
    return preamble[len(conv.prefill) :]


def _split_pieces(text: str, pieces: int = 3) -> list[str]:
    if len(text) < pieces:
        return [text]
    size = -(-len(text) // pieces)
    return [text[i : i + size] for i in range(0, len(text), size)]


# --------------------------------------------------------------------------------------------------------------
# Request interpretation (provider-neutral)


@dataclass
class _ToolSpec:
    name: str
    schema: dict[str, Any]
    legacy: bool = False  # one of a chat completion's legacy ``functions``: called by a ``function_call``


@dataclass
class _Conversation:
    prompt_tokens: int = 0
    user_text: str = ""
    directives: dict[str, str] = field(default_factory=dict)
    tool_result: str | None = None
    last_is_user: bool = False
    prefill: str | None = None  # the text of a last assistant message (OpenAI): a reply to continue


@dataclass
class _Reply:
    text: str | None
    tokens: list[str]
    finish: Finish
    stop_sequence: str | None = None
    tool_name: str | None = None
    tool_arguments: dict[str, Any] | None = None
    tool_id: str = ""
    tool_count: int = 1  # ``[[tool_calls=N]]``: the same call N times, each with its own id
    legacy_function: bool = False  # answered as a legacy ``function_call`` (the request gave ``functions``)
    own_tool_ids: tuple[str, ...] = ()  # every call's id, when drawn otherwise than from ``tool_id`` (Mistral's)
    arguments_object: bool = False  # ``[[arguments=object]]``: OpenAI routes send the arguments as a JSON object
    tool_calls_object: bool = False  # ``[[tool_calls_shape=object]]``: a streamed delta's tool_calls as its one call

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.tool_arguments or {})

    @property
    def openai_arguments(self) -> str | dict[str, Any]:
        """A call's ``function.arguments`` as the OpenAI routes send it: the JSON text, or (``arguments_object``)
        the object itself, as Hugging Face TGI and llama.cpp's ``--tool-args-object`` do."""
        return (self.tool_arguments or {}) if self.arguments_object else self.arguments_json

    @property
    def tool_ids(self) -> list[str]:
        if self.own_tool_ids:
            return list(self.own_tool_ids)
        return [self.tool_id] + [f"{self.tool_id}_{number}" for number in range(1, self.tool_count)]

    def with_mistral_tool_ids(self) -> _Reply:
        """This reply with its calls' ids as Mistral draws them: 9 letters and digits (``D681PevKs``), the only form
        it takes back (``_MISTRAL_TOOL_CALL_ID``)."""
        if self.tool_name is None:
            return self
        ids = tuple("".join(random.choices(_ALPHANUMERIC, k=9)) for _ in range(self.tool_count))  # noqa: S311 (ids)
        return replace(self, tool_id=ids[0], own_tool_ids=ids)

    @property
    def completion_tokens(self) -> int:
        if self.tool_name is not None:
            return count_words(f"{self.tool_name} {self.arguments_json}") * self.tool_count
        return len(self.tokens)


def demo_answer(prompt: str) -> str:
    """Demo mode's reply to ``prompt`` (directives already removed): by keyword, else by its CRC-32."""
    words = set(re.findall(r"[a-z0-9]+", prompt.lower()))
    for name, keywords in _DEMO_KEYWORDS:
        if words & keywords:
            return _DEMO_ANSWERS[name]
    answers = list(_DEMO_ANSWERS.values())
    return answers[zlib.crc32(prompt.encode()) % len(answers)]


def raw_directive(data: bytes, *, marker: str = "raw") -> str:
    """The ``[[raw=...]]`` marker that has a chat completion answered with exactly ``data`` (module docstring);
    ``marker="raw_anthropic"`` / ``"raw_gemini"``: Anthropic's Messages / Gemini's generateContent so answered."""
    return f"[[{marker}=" + base64.urlsafe_b64encode(data).decode().rstrip("=") + "]]"


def _extract_directives(text: str) -> tuple[str, dict[str, str]]:
    directives = {name: value.strip() for name, value in _DIRECTIVE_RE.findall(text)}
    return _DIRECTIVE_RE.sub("", text).strip(), directives


def _follow_up(conv: _Conversation, turns: list[tuple[str, str | None]]) -> None:
    """``[[then=...]]``: the scripted reply to the turn after an assistant message (module docstring).
    ``turns``: each message's role and its text (None: no text)."""
    pending = answer = None
    for role, text in turns:
        if role == "user" and text is not None:
            pending = _extract_directives(text)[1].get("then", pending)
        elif role == "assistant" and pending is not None:
            answer, pending = pending, None
    if answer is not None and "reply" not in conv.directives and "words" not in conv.directives:
        conv.directives["reply"] = answer


class _Tally:
    """Accumulates the words/images of one message, and its texts' UTF-8 bytes (``[[count=bytes]]``)."""

    def __init__(self) -> None:
        self.words = 0
        self.bytes = 0
        self.images = 0

    def text(self, value: Any) -> None:
        if isinstance(value, str):
            self.words += count_words(value)
            self.bytes += _utf8_bytes(value)

    @property
    def tokens(self) -> int:
        return _MESSAGE_OVERHEAD + self.words + _IMAGE_TOKENS * self.images

    @property
    def byte_tokens(self) -> int:
        return _MESSAGE_OVERHEAD + self.bytes + _IMAGE_TOKENS * self.images


def _counted_in_bytes(conv: _Conversation, byte_tokens: int) -> None:
    """``[[count=bytes]]`` (OpenAI's and Anthropic's chat): the prompt counted a token a UTF-8 byte, not a word."""
    if conv.directives.get("count") == "bytes":
        conv.prompt_tokens = byte_tokens


def _content_text(content: Any, text_type: str, image_types: tuple[str, ...]) -> str | None:
    """The displayable text of a message body, or None when it has no text or image part."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    parts: list[str] = []
    for part in content:
        if not isinstance(part, dict):
            continue
        if part.get("type") == text_type and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif part.get("type") in image_types:
            parts.append("[image]")
    return " ".join(parts) if parts else None


def _tally_openai_content(content: Any, tally: _Tally) -> None:
    if isinstance(content, str):
        tally.text(content)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            if part.get("type") == "image_url":
                tally.images += 1
            else:
                tally.text(part.get("text") or part.get("refusal"))


def _parse_openai(body: dict[str, Any]) -> _Conversation:
    conv = _Conversation()
    messages = body.get("messages")
    if not isinstance(messages, list):
        return conv
    user_text: str | None = None
    byte_tokens = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        tally = _Tally()
        _tally_openai_content(message.get("content"), tally)
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                tally.text(call["function"].get("arguments"))
        conv.prompt_tokens += tally.tokens
        byte_tokens += tally.byte_tokens
        if message.get("role") == "user":
            text = _content_text(message.get("content"), "text", ("image_url",))
            if text is not None:
                user_text = text
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") in ("tool", "function"):
        conv.tool_result = _content_text(last.get("content"), "text", ()) or ""
    conv.last_is_user = last.get("role") == "user"
    if last.get("role") == "assistant":
        conv.prefill = _content_text(last.get("content"), "text", ()) or ""
    conv.user_text, conv.directives = _extract_directives(user_text or "")
    _counted_in_bytes(conv, byte_tokens)
    _follow_up(
        conv,
        [
            (m.get("role"), _content_text(m.get("content"), "text", ("image_url",)))
            for m in messages
            if isinstance(m, dict)
        ],
    )
    return conv


def _tally_anthropic_blocks(content: Any, tally: _Tally) -> None:
    if isinstance(content, str):
        tally.text(content)
        return
    if not isinstance(content, list):
        return
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "image":
            tally.images += 1
        elif kind == "tool_use":
            tally.text(json.dumps(block.get("input", {})))
        elif kind == "tool_result":
            _tally_anthropic_blocks(block.get("content"), tally)
        elif kind == "thinking":
            tally.text(block.get("thinking"))
        else:
            tally.text(block.get("text"))


def _anthropic_tool_result(content: Any) -> str | None:
    if not isinstance(content, list):
        return None
    results = [
        _content_text(block.get("content"), "text", ()) or ""
        for block in content
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]
    return " ".join(results) if results else None


def _parse_anthropic(body: dict[str, Any]) -> _Conversation:
    conv = _Conversation()
    system = body.get("system")
    system_text = system if isinstance(system, str) else _content_text(system, "text", ())
    byte_tokens = 0
    if system_text:
        conv.prompt_tokens += _MESSAGE_OVERHEAD + count_words(system_text)
        byte_tokens += _MESSAGE_OVERHEAD + _utf8_bytes(system_text)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return conv
    user_text: str | None = None
    for message in messages:
        if not isinstance(message, dict):
            continue
        tally = _Tally()
        _tally_anthropic_blocks(message.get("content"), tally)
        conv.prompt_tokens += tally.tokens
        byte_tokens += tally.byte_tokens
        if message.get("role") == "user":
            text = _content_text(message.get("content"), "text", ("image",))
            if text is not None:
                user_text = text
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    if last.get("role") == "user":
        conv.tool_result = _anthropic_tool_result(last.get("content"))
        conv.last_is_user = conv.tool_result is None
    conv.user_text, conv.directives = _extract_directives(user_text or "")
    _counted_in_bytes(conv, byte_tokens)
    _follow_up(
        conv,
        [(m.get("role"), _content_text(m.get("content"), "text", ("image",))) for m in messages if isinstance(m, dict)],
    )
    return conv


def _openai_tool(body: dict[str, Any]) -> _ToolSpec | None:
    if not body.get("tools") and body.get("functions"):
        return _openai_function(body)
    choice = body.get("tool_choice")
    if choice == "none":
        return None
    tools = [
        tool["function"]
        for tool in body.get("tools") or []
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict) and tool["function"].get("name")
    ]
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        tools = [tool for tool in tools if tool["name"] == choice["function"].get("name")] or tools
    elif isinstance(choice, dict) and isinstance(choice.get("allowed_tools"), dict):
        # OpenAI's allowed_tools: the model calls only among those it lists.
        allowed = {
            entry["function"].get("name")
            for entry in choice["allowed_tools"].get("tools") or ()
            if isinstance(entry, dict) and isinstance(entry.get("function"), dict)
        }
        tools = [tool for tool in tools if tool["name"] in allowed]
    if not tools:
        return None
    return _ToolSpec(tools[0]["name"], tools[0].get("parameters") or {})


def _openai_function(body: dict[str, Any]) -> _ToolSpec | None:
    """The legacy ``functions`` (and ``function_call``: ``none``, ``auto`` or ``{"name": ...}``), which OpenAI
    still answers with a message's ``function_call`` instead of ``tool_calls``."""
    choice = body.get("function_call")
    if choice == "none":
        return None
    functions = [f for f in body.get("functions") or [] if isinstance(f, dict) and f.get("name")]
    if isinstance(choice, dict):
        functions = [f for f in functions if f["name"] == choice.get("name")] or functions
    if not functions:
        return None
    return _ToolSpec(functions[0]["name"], functions[0].get("parameters") or {}, legacy=True)


def _anthropic_tool(body: dict[str, Any]) -> _ToolSpec | None:
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "none":
        return None
    tools = [tool for tool in body.get("tools") or [] if isinstance(tool, dict) and tool.get("name")]
    if isinstance(choice, dict) and choice.get("type") == "tool":
        tools = [tool for tool in tools if tool["name"] == choice.get("name")] or tools
    if not tools:
        return None
    return _ToolSpec(tools[0]["name"], tools[0].get("input_schema") or {})


def _tool_arguments(schema: dict[str, Any], user_text: str) -> dict[str, Any]:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return {}
    arguments: dict[str, Any] = {}
    for name, prop in properties.items():
        prop = prop if isinstance(prop, dict) else {}
        kind = prop.get("type")
        if isinstance(kind, list):
            kind = next((item for item in kind if item != "null"), None)
        if isinstance(prop.get("enum"), list) and prop["enum"]:
            arguments[name] = prop["enum"][0]
        elif kind in ("number", "integer"):
            arguments[name] = 42
        elif kind == "boolean":
            arguments[name] = True
        elif kind == "array":
            arguments[name] = []
        elif kind == "object":
            arguments[name] = {}
        else:
            arguments[name] = user_text
    return arguments


def _tool_count(directives: dict[str, str]) -> int:
    wanted = directives.get("tool_calls", "1")
    return min(int(wanted), 8) if wanted.isdigit() and int(wanted) >= 1 else 1


def azure_takes_max_completion_tokens(api_version: str) -> bool:
    """Whether an Azure OpenAI api-version knows ``max_completion_tokens`` (``AZURE_MAX_COMPLETION_TOKENS_SINCE``)."""
    dated = re.match(r"\d{4}-\d{2}-\d{2}", api_version)
    return dated is None or dated.group() >= AZURE_MAX_COMPLETION_TOKENS_SINCE


def azure_takes_service_tier(api_version: str) -> bool:
    """Whether an Azure OpenAI api-version knows ``service_tier`` (``AZURE_SERVICE_TIER_SINCE``)."""
    dated = re.match(r"\d{4}-\d{2}-\d{2}", api_version)
    return dated is None or dated.group() >= AZURE_SERVICE_TIER_SINCE


# What a chat completion with ``web_search_options`` cites, unless ``[[url_citation=URL]]`` names another.
_WEB_SEARCH_SOURCE = "https://search.example/1"
# OpenAI's search models (gpt-4o-search-preview, gpt-4o-mini-search-preview, gpt-5-search-api, their dated
# snapshots), which search the web before every answer, ``web_search_options`` or not.
_OPENAI_SEARCH_MODEL = re.compile(
    r"(?:^|/)gpt-[a-z0-9.-]*?-search-(?:preview|api)(?:-\d{4}-\d{2}-\d{2})?$", re.IGNORECASE
)


def _url_citations(url: str | None, reply: _Reply) -> list[dict[str, Any]]:
    """``[[url_citation=URL]]``: OpenAI's ``annotations`` citing URL for the whole of a text reply (none for a call)."""
    if not url or reply.text is None:
        return []
    span = {"start_index": 0, "end_index": len(reply.text), "url": url, "title": "Fake source"}
    return [{"type": "url_citation", "url_citation": span}]


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _build_reply(
    conv: _Conversation,
    tool: _ToolSpec | None,
    max_tokens: int | None,
    stops: list[str],
    tool_id_prefix: str,
    demo: bool = False,
) -> _Reply:
    directives = conv.directives
    if "reply" in directives:
        text = directives["reply"]
    elif "words" in directives:
        count = int(directives["words"]) if directives["words"].isdigit() else 0
        text = " ".join(_LOREM[i % len(_LOREM)] for i in range(count))
    elif conv.tool_result is not None:
        text = "Tool result: " + conv.tool_result
    elif tool is not None and (conv.last_is_user or _preamble_continued(conv) is not None):
        return _Reply(
            text=None,
            tokens=[],
            finish="tool",
            tool_name=tool.name,
            tool_arguments=_tool_arguments(tool.schema, conv.user_text),
            tool_id=_new_id(tool_id_prefix),
            tool_count=1 if tool.legacy else _tool_count(directives),
            legacy_function=tool.legacy,
            arguments_object=directives.get("arguments") == "object",
            tool_calls_object=directives.get("tool_calls_shape") == "object",
        )
    elif demo:
        text = demo_answer(conv.user_text)
    else:
        text = "Echo: " + conv.user_text

    tokens = split_tokens(text)
    finish: Finish = "stop"
    length_cut = text
    if max_tokens is not None and len(tokens) > max_tokens:
        length_cut = "".join(tokens[:max_tokens])
        finish = "length"
    found = [(text.find(stop), stop) for stop in stops if stop and stop in text]
    if found:
        index, sequence = min(found)
        if index <= len(length_cut):
            text = text[:index]
            return _Reply(text=text, tokens=split_tokens(text), finish="stop_sequence", stop_sequence=sequence)
    if finish == "length":
        return _Reply(text=length_cut, tokens=tokens[:max_tokens], finish="length")
    return _Reply(text=text, tokens=tokens, finish="stop")


# --------------------------------------------------------------------------------------------------------------
# Errors


# Request fields that Ollama's OpenAI compatibility does not read (its ``ChatCompletionRequest`` has no such
# field) and so ignores, where OpenAI would act on them.
_OLLAMA_IGNORED = frozenset({"n", "max_completion_tokens", "tool_choice", "web_search_options"})

# The content parts Ollama's OpenAI compatibility reads (its ``FromChatRequest``, whatever the message's role): another
# (OpenAI's ``refusal``, ``input_audio``, ``file``) is its 400 ``invalid message format`` (``_ollama_content_parts``).
_OLLAMA_CONTENT_PARTS = frozenset({"text", "image_url"})


# The image URLs Ollama's OpenAI compatibility reads (its ``decodeImageURL``: these prefixes, as written, and no
# http(s) URL, which it does not fetch): another is its 400 ``invalid image input``.
_OLLAMA_IMAGE_PREFIXES = (*(f"data:image/{kind};base64," for kind in ("jpeg", "jpg", "png", "webp")), "data:;base64,")


def _ollama_content_parts(body: Any) -> web.Response | None:
    """Ollama's 400 for a content part it does not read, or an image URL it does not decode, in the error shape of its
    OpenAI compatibility (its ``NewError``: no param, no code)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, dict) or part.get("type") not in _OLLAMA_CONTENT_PARTS:
                return _openai_error(400, "invalid message format", "invalid_request_error")
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if part["type"] == "image_url" and not (isinstance(url, str) and url.startswith(_OLLAMA_IMAGE_PREFIXES)):
                if isinstance(url, str) and url.startswith(("http://", "https://")):
                    said = "image URLs are not currently supported, please use base64 encoded data instead"
                    return _openai_error(400, said, "invalid_request_error")
                return _openai_error(400, "invalid image input", "invalid_request_error")
    return None


# The request fields Mistral's API takes (its OpenAPI document); any other is refused with a 422.
_MISTRAL_CHAT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "top_p",
        "max_tokens",
        "stream",
        "stop",
        "random_seed",
        "metadata",
        "response_format",
        "tools",
        "tool_choice",
        "presence_penalty",
        "frequency_penalty",
        "n",
        "prediction",
        "parallel_tool_calls",
        "reasoning_effort",  # its ReasoningEffort: MISTRAL_REASONING_EFFORTS
        "prompt_mode",
        "guardrails",  # a list of its GuardrailConfig (block_on_error, moderation_llm_v1, moderation_llm_v2)
        "prompt_cache_key",  # routes requests sharing it to Mistral's prompt cache
        "safe_prompt",
    }
)
# The ``reasoning_effort`` values Mistral's chat completions take (its ``ReasoningEffort`` enum: the adjustable
# reasoning of Mistral Small, a full thinking chunk or next to none); another is its 422 (``_mistral_invalid_effort``).
MISTRAL_REASONING_EFFORTS = ("none", "high")
# Codestral's fill-in-the-middle request (``FIMCompletionRequest``).
_MISTRAL_FIM_FIELDS = frozenset(
    {"model", "prompt", "suffix", "temperature", "top_p", "max_tokens", "min_tokens", "stream", "stop", "random_seed"}
)
_MISTRAL_EMBEDDING_FIELDS = frozenset(
    {"model", "input", "metadata", "output_dimension", "output_dtype", "encoding_format"}
)
MISTRAL_EMBED_BATCH_LIMIT = 512  # inputs in one embeddings request


# The fields of an assistant message Mistral's API takes (its ``AssistantMessage``): any other (another provider's
# ``reasoning_content``, LiteLLM's ``thinking_blocks``, ...) is refused with a 422, as a field of the request is.
_MISTRAL_ASSISTANT_FIELDS = frozenset({"role", "content", "tool_calls", "prefix"})


def _mistral_validation_error(detail: list[dict[str, Any]]) -> web.Response:
    """Mistral's 422 for a body its validation refuses: pydantic's ``detail`` list inside its error object."""
    answer = {
        "object": "error",
        "message": {"detail": detail},
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    return web.json_response(answer, status=422)


def _mistral_extra_fields(body: Any, allowed: frozenset[str]) -> web.Response | None:
    """Mistral's 422 for fields it does not take, in its own shape (a pydantic ``extra_forbidden`` list under
    ``message.detail``: no OpenAI-style ``error`` object): of the request, and of its assistant messages."""
    if not isinstance(body, dict):
        return None
    extra: list[tuple[list[Any], Any]] = [(["body", name], body[name]) for name in body if name not in allowed]
    messages = body.get("messages") if "messages" in allowed else None
    for index, message in enumerate(messages if isinstance(messages, list) else ()):
        if isinstance(message, dict) and message.get("role") == "assistant":
            extra.extend(
                (["body", "messages", index, "assistant", name], value)
                for name, value in message.items()
                if name not in _MISTRAL_ASSISTANT_FIELDS
            )
    if not extra:
        return None
    detail = [
        {"type": "extra_forbidden", "loc": loc, "msg": "Extra inputs are not permitted", "input": value}
        for loc, value in extra
    ]
    return _mistral_validation_error(detail)


def _mistral_invalid_effort(body: Any) -> web.Response | None:
    """Mistral's 422 for a ``reasoning_effort`` outside its enum (``MISTRAL_REASONING_EFFORTS``; null is taken, as
    the field is nullable), in the shape of its other validation errors."""
    effort = body.get("reasoning_effort") if isinstance(body, dict) else None
    if effort is None or effort in MISTRAL_REASONING_EFFORTS:
        return None
    expected = " or ".join(repr(name) for name in MISTRAL_REASONING_EFFORTS)
    detail = {
        "type": "enum",
        "loc": ["body", "reasoning_effort"],
        "msg": f"Input should be {expected}",
        "input": effort,
        "ctx": {"expected": expected},
    }
    return _mistral_validation_error([detail])


# The content chunks Mistral's messages take, by their ``type`` (its OpenAPI document's ``ContentChunk``, a tagged
# union; a system message's ``SystemMessageContentChunks``): another (OpenAI's ``refusal`` part) is its 422.
_MISTRAL_CONTENT_CHUNKS = ("text", "image_url", "document_url", "reference", "file", "thinking", "input_audio")
_MISTRAL_SYSTEM_CHUNKS = ("text", "thinking")


def _mistral_content_chunks(body: Any) -> web.Response | None:
    """Mistral's 422 for a content chunk of its messages of a type it has not (the discriminated union's
    ``union_tag_invalid``), in the shape of its other validation errors."""
    messages = body.get("messages") if isinstance(body, dict) else None
    detail = []
    for index, message in enumerate(messages if isinstance(messages, list) else ()):
        content = message.get("content") if isinstance(message, dict) else None
        role = message.get("role") if isinstance(message, dict) else None
        expected = _MISTRAL_SYSTEM_CHUNKS if role == "system" else _MISTRAL_CONTENT_CHUNKS
        for position, chunk in enumerate(content if isinstance(content, list) else ()):
            tag = chunk.get("type") if isinstance(chunk, dict) else None
            if tag in expected:
                continue
            tags = ", ".join(repr(name) for name in expected)
            detail.append(
                {
                    "type": "union_tag_invalid",
                    "loc": ["body", "messages", index, role, "content", position],
                    "msg": f"Input tag {tag!r} found using 'type' does not match any of the expected tags: {tags}",
                    "input": chunk,
                    "ctx": {"discriminator": "'type'", "tag": str(tag), "expected_tags": tags},
                }
            )
    if not detail:
        return None
    return _mistral_validation_error(detail)


# A tool call's id as Mistral takes it (in an assistant message's ``tool_calls`` and a tool message's
# ``tool_call_id``): any other is refused with its 400.
_MISTRAL_TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")


def _mistral_tool_call_ids(body: Any) -> web.Response | None:
    """Mistral's 400 for a tool call id in a request's messages that is not 9 letters and digits (another
    provider's ``call_…`` or ``toolu_…``)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, dict):
            continue
        calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
        ids = [call.get("id") for call in calls if isinstance(call, dict)]
        if message.get("role") == "tool":
            ids.append(message.get("tool_call_id"))
        for call_id in ids:
            if not isinstance(call_id, str) or not _MISTRAL_TOOL_CALL_ID.fullmatch(call_id):
                answer = {
                    "object": "error",
                    "message": f"Tool call id was {call_id} but must be a-z, A-Z, 0-9, with a length of 9.",
                    "type": "invalid_function_call",
                    "param": None,
                    "code": "3280",
                }
                return web.json_response(answer, status=400)
    return None


def _mistral_last_role(body: Any) -> web.Response | None:
    """Mistral's 400 for a request whose last message is the assistant's without ``"prefix": true``: Mistral serves
    a final assistant message only as a prefix its reply begins with."""
    messages = body.get("messages") if isinstance(body, dict) else None
    last = messages[-1] if isinstance(messages, list) and messages and isinstance(messages[-1], dict) else {}
    if last.get("role") != "assistant" or last.get("prefix") is True:
        return None
    answer = {
        "object": "error",
        "message": "Expected last role User or Tool (or Assistant with prefix True) for serving but got assistant",
        "type": "invalid_request_message_order",
        "param": None,
        "code": "3230",
    }
    return web.json_response(answer, status=400)


def _openai_strict_tools(tools: Any) -> web.Response | None:
    """OpenAI's 400 for a ``strict`` function whose parameters, an object schema, do not say
    ``"additionalProperties": false`` (strict mode holds the call to the schema, which must then close every object;
    only the schema's top level is checked here)."""
    for index, tool in enumerate(tools if isinstance(tools, list) else ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or function.get("strict") is not True:
            continue
        parameters = function.get("parameters")
        if isinstance(parameters, dict) and parameters.get("additionalProperties") is not False:
            return _openai_error(
                400,
                f"Invalid schema for function {function.get('name')!r}: In context=(), 'additionalProperties' is "
                "required to be supplied and to be false.",
                "invalid_request_error",
                "invalid_function_parameters",
                f"tools[{index}].function.parameters",
            )
    return None


def _openai_error(
    status: int, message: str, kind: str, code: str | None = None, param: str | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers={"x-request-id": _new_id("req_")})


def _anthropic_error(status: int, kind: str, message: str) -> web.Response:
    request_id = _new_id("req_")
    body = {"type": "error", "error": {"type": kind, "message": message}, "request_id": request_id}
    return web.json_response(body, status=status, headers={"request-id": request_id})


def _error(
    provider: Provider, status: int, message: str, kind: str | None = None, code: str | None = None
) -> web.Response:
    if provider == "anthropic":
        return _anthropic_error(status, kind or _anthropic_error_type(status), message)
    if provider == "gemini":
        return _gemini_error(status, message)
    return _openai_error(status, message, kind or _openai_error_type(status), code)


def _anthropic_error_type(status: int) -> str:
    known = {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        504: "timeout_error",
        529: "overloaded_error",
    }
    return known.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _openai_error_type(status: int) -> str:
    if status == 429:
        return "requests"
    return "server_error" if status >= 500 else "invalid_request_error"


_OPENAI_FAULTS: dict[int, tuple[str, str | None, str]] = {
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again in 2s."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    529: ("server_error", "overloaded", "The server is overloaded, please try again later."),
}
_ANTHROPIC_FAULT_MESSAGES: dict[int, str] = {
    401: "invalid x-api-key",
    429: "Number of request tokens has exceeded your per-minute rate limit.",
    500: "Internal server error",
    503: "Service unavailable",
    529: "Overloaded",
}


def _status_fault(provider: Provider, status: int, retry_after: str = "2") -> web.Response:
    """The provider's error for ``status``; a 429 says its wait (``retry_after``: seconds, ``Nms``, or ``none``)."""
    if provider == "gemini":
        message = _GEMINI_FAULT_MESSAGES.get(status, f"Injected fault {status}")
        if status == 429 and retry_after != "none":
            # Google sends no Retry-After header: the delay is a RetryInfo detail of the error body.
            seconds = f"{float(retry_after[:-2]) / 1000:g}" if retry_after.endswith("ms") else retry_after
            retry_info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{seconds}s"}
            return _gemini_error(status, message, details=[retry_info])
        response = _gemini_error(status, message)
    elif provider == "anthropic":
        message = _ANTHROPIC_FAULT_MESSAGES.get(status, f"Injected fault {status}")
        response = _anthropic_error(status, _anthropic_error_type(status), message)
    else:
        kind, code, message = _OPENAI_FAULTS.get(status, (_openai_error_type(status), None, f"Injected fault {status}"))
        response = _openai_error(status, message, kind, code)
    if status == 429 and provider != "gemini" and retry_after != "none":
        if retry_after.endswith("ms"):
            response.headers["retry-after-ms"] = retry_after[:-2]  # as OpenAI's API may say it
        else:
            response.headers["Retry-After"] = retry_after
    return response


def _context_fault(provider: Provider, prompt_tokens: int) -> web.Response:
    if provider == "gemini":
        window = _GEMINI_CONTEXT_WINDOW
        return _gemini_error(
            400,
            f"The input token count ({window + prompt_tokens}) exceeds the maximum number of tokens allowed "
            f"({window}).",
        )
    if provider == "anthropic":
        window = _ANTHROPIC_CONTEXT_WINDOW
        return _anthropic_error(
            400, "invalid_request_error", f"prompt is too long: {window + prompt_tokens} tokens > {window} maximum"
        )
    window = _OPENAI_CONTEXT_WINDOW
    message = (
        f"This model's maximum context length is {window} tokens. However, your messages resulted in "
        f"{window + prompt_tokens} tokens. Please reduce the length of the messages."
    )
    return _openai_error(400, message, "invalid_request_error", "context_length_exceeded", "messages")


def _web_searches(usage: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The blocks of the web searches ``usage`` reports (``[[web_search=N]]``), as Anthropic's message has them
    before its reply: each search's ``server_tool_use`` call and its ``web_search_tool_result``."""
    searches = (usage.get("server_tool_use") or {}).get("web_search_requests") or 0
    blocks = []
    for number in range(1, searches + 1):
        call_id = f"srvtoolu_fake{number:04d}"
        call = {"type": "server_tool_use", "id": call_id, "name": "web_search", "input": {"query": f"search {number}"}}
        found = {
            "type": "web_search_result",
            "url": f"https://search.example/{number}",
            "title": "Fake source",
            "encrypted_content": "ZmFrZQ==",
            "page_age": None,
        }
        blocks.append((call, {"type": "web_search_tool_result", "tool_use_id": call_id, "content": [found]}))
    return blocks


# --------------------------------------------------------------------------------------------------------------
# Fault names

# A status fault and the wait it says: seconds (``Retry-After``), ``Nms`` (``retry-after-ms``) or ``none``.
_STATUS_FAULT_RE = re.compile(r"(\d{3})(?::(\d+(?:\.\d+)?(?:ms)?|none))?")
_SIMPLE_FAULTS = frozenset({"refuse", "hang", "context", "error-event", "drop-after-usage"})


def fault_canonical(spec: str) -> str:
    """The fault name the handlers act on, from any of its spellings (see "Several upstreams" in the module
    docstring): ``503`` or ``status=503``; ``429:1`` or ``status=429,retry_after=1`` (``250ms``, ``none``); ``cut-3`` or
    ``cut_after=3``; ``context`` or ``context_length``; ``refuse``; ``hang``; ``error-event``. Raises
    ValueError for anything else."""
    spec = spec.strip()
    if spec in _SIMPLE_FAULTS or re.fullmatch(r"cut-\d+", spec):
        return spec
    if spec == "context_length":
        return "context"
    if _fault_status(spec) is not None:
        return spec
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() in fields:
            raise ValueError(f"unknown fake fault {spec!r}")
        fields[key.strip()] = value.strip()
    if set(fields) == {"cut_after"} and fields["cut_after"].isdigit():
        return f"cut-{fields['cut_after']}"
    if "status" in fields and set(fields) <= {"status", "retry_after"}:
        canonical = fields["status"] + (f":{fields['retry_after']}" if "retry_after" in fields else "")
        if _fault_status(canonical) is not None:
            return canonical
    raise ValueError(f"unknown fake fault {spec!r}")


def _fault_models(fault: str | None, models: Any) -> frozenset[str] | None:
    """The upstream model ids a standing fault is limited to (None: every request)."""
    if models is None:
        return None
    if not isinstance(models, list | tuple | set | frozenset) or not all(isinstance(m, str) and m for m in models):
        raise ValueError("models: give a list of upstream model ids")
    if fault == "refuse":
        raise ValueError("refuse closes the whole port: it cannot be limited to some models")
    return frozenset(models)


def _fault_status(fault: str) -> tuple[int, str] | None:
    """``(status, the wait said)`` of a status fault (``503``, ``429:1``, ``429:250ms``, ``429:none``), None for
    other faults."""
    match = _STATUS_FAULT_RE.fullmatch(fault)
    if match is None or not 400 <= int(match.group(1)) <= 599:
        return None
    return int(match.group(1)), match.group(2) or "2"


# --------------------------------------------------------------------------------------------------------------
# The server


@dataclass
class _Timing:
    latency: float
    tps: float
    ttft: float = 0.0

    @property
    def token_delay(self) -> float:
        return 1.0 / self.tps if self.tps > 0 else 0.0

    def before_piece(self, position: int) -> float:
        """The pause before the streamed piece at ``position``: the time to first token comes on top of the
        first piece's own delay."""
        return self.token_delay + (self.ttft if position == 0 else 0.0)

    def whole_reply(self, pieces: int) -> float:
        """What a non-streamed reply of ``pieces`` tokens is held back by (after the latency)."""
        return self.ttft + pieces * self.token_delay


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)


class _Aborted(Exception):
    """The connection is (to be) dropped without a proper response: a fault, or the server stopping."""


# Anthropic's cap on prompt-cache breakpoints in one request (tools, system and messages together), and the blocks
# that hold one.
ANTHROPIC_MAX_CACHE_CONTROLS = 4


def _anthropic_cache_marks(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The ``cache_control`` of each block of a Messages request that carries one, with the block's place
    (``messages.0.content.4``), in the order Anthropic processes them: its tools, its system blocks, then its turns'
    content blocks, a tool result's own content blocks after the result itself."""
    places: list[tuple[str, Any]] = [(f"tools.{i}", tool) for i, tool in enumerate(body.get("tools") or [])]
    if isinstance(body.get("system"), list):
        places.extend((f"system.{j}", block) for j, block in enumerate(body["system"]))
    for i, turn in enumerate(body.get("messages") or []):
        content = turn.get("content") if isinstance(turn, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else []):
            places.append((f"messages.{i}.content.{j}", block))
            inner = block.get("content") if isinstance(block, dict) and block.get("type") == "tool_result" else None
            if isinstance(inner, list):
                places.extend((f"messages.{i}.content.{j}.content.{k}", part) for k, part in enumerate(inner))
    return [
        (place, block["cache_control"])
        for place, block in places
        if isinstance(block, dict) and isinstance(block.get("cache_control"), dict)
    ]


def _anthropic_cache_controls(body: dict[str, Any]) -> int:
    """The blocks of a Messages request that carry a ``cache_control``, as Anthropic counts them against its four
    (``_anthropic_cache_marks``)."""
    return len(_anthropic_cache_marks(body))


def _anthropic_cache_ttl_misordered(body: dict[str, Any]) -> str | None:
    """Anthropic's words for a ``cache_control`` of the 1-hour TTL after one of the 5-minute TTL (``ttl`` "5m" or
    none, the default) in the order it processes blocks: longer-lived cache entries must come first. None when
    the order is valid."""
    short_seen = False
    for place, mark in _anthropic_cache_marks(body):
        ttl = mark.get("ttl", "5m")
        if ttl == "1h" and short_seen:
            return (
                f"{place}.cache_control.ttl: a ttl='1h' cache_control block must not come after a ttl='5m' "
                "cache_control block. Note that blocks are processed in the following order: `tools`, `system`, "
                "`messages`."
            )
        short_seen = short_seen or ttl == "5m"
    return None


class _App:
    def __init__(
        self,
        latency_ms: float,
        tps: float,
        api_key: str | None,
        demo: bool = False,
        *,
        name: str = "upstream",
        ttft_ms: float = 0,
    ) -> None:
        self.name = name
        self.latency_ms = latency_ms
        self.ttft_ms = ttft_ms
        self.tps = tps
        self.obfuscation = False  # OpenAI's padding in every stream's chunks (``--obfuscation``)
        self.api_key = api_key
        # Keys accepted besides ``api_key`` (users' own keys in tests): set with /__control {"accept_keys": [...]}.
        self.accept_keys: frozenset[str] = frozenset()
        self.demo = demo
        # The standing fault (canonical, see fault_canonical): what every request gets that names none itself,
        # or only those for the upstream model ids in fault_models (one model down at a provider).
        self.fault: str | None = None
        self.fault_models: frozenset[str] | None = None
        # Set by the listener that serves this app: what /__control acts on (itself, or a peer by name).
        self.listener: _Listener | None = None
        self._lock = threading.Lock()
        self._requests = 0
        self._by_path: Counter[str] = Counter()
        self._by_model: Counter[str] = Counter()
        self._faults_seen: Counter[tuple[tuple[str, str], ...]] = Counter()  # ``[[fault_times=N]]``
        self._log: deque[dict[str, Any]] = deque(maxlen=_REQUEST_LOG_SIZE)
        self.stopping: asyncio.Event | None = None
        # The pauses of paced replies in progress (``_pause``), which ``halt`` ends at once.
        self._pausing: set[asyncio.Future[None]] = set()

    def halt(self) -> None:
        """The server is stopping: every pause ends now, and every reply in progress is dropped."""
        if self.stopping is not None:
            self.stopping.set()
        for woken in self._pausing:
            _wake(woken)

    # -- bookkeeping (read from other threads, hence the lock) --

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self._requests, "by_path": dict(self._by_path), "by_model": dict(self._by_model)}

    def settings(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fault": self.fault,
            "fault_models": sorted(self.fault_models) if self.fault_models is not None else None,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "tps": self.tps,
        }

    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(list(self._log))

    def reset(self) -> None:
        with self._lock:
            self._requests = 0
            self._by_path.clear()
            self._by_model.clear()
            self._faults_seen.clear()
            self._log.clear()

    def _record(self, request: web.Request, body: Any) -> dict[str, Any]:
        headers = {
            key.lower(): _mask(value) if key.lower() in _MASKED_HEADERS else value
            for key, value in request.headers.items()
        }
        model = body.get("model") if isinstance(body, dict) else None
        with self._lock:
            self._requests += 1
            self._by_path[request.path] += 1
            if isinstance(model, str):
                self._by_model[model] += 1
            entry = {
                "path": request.path,
                "method": request.method,
                "headers": headers,
                "body": body,
                # Which key the request came with, without keeping it: tests compare digests.
                "key_sha256": key_digest(_presented_key(request)),
                "received_at": time.monotonic(),
            }
            self._log.append(entry)
        return entry

    def _answered_at(self, request: web.Request) -> None:
        """When the answer was ready, on the request's entry in the log (``received_at`` is when it came, both
        ``time.monotonic()`` of this process): a test sees how many calls were in flight at once without timing
        anything itself."""
        entry = request.get(_LOG_ENTRY_KEY)
        if entry is not None:
            with self._lock:
                entry["answered_at"] = time.monotonic()

    def _closed_early(self, request: web.Request) -> None:
        """The client closed the connection before the reply's end: said on its entry in the log."""
        entry = request.get(_LOG_ENTRY_KEY)
        if entry is not None:
            with self._lock:
                entry["closed_early"] = True

    # -- aiohttp plumbing --

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024**2)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.text_completions)
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.messages_count_tokens)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/moderations", self.moderations)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model_id}", self.model)
        app.router.add_get("/v1beta/models", self.gemini_models)
        app.router.add_post("/v1beta/models/{model_action}", self.gemini_model_action)
        from . import fake_cohere  # imports this module: loaded here, not at the top

        fake_cohere.add_routes(app.router, self)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self.azure(self.chat_completions))
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self.azure(self.embeddings))
        app.router.add_get("/openai/models", self.azure(self.models))
        app.router.add_post("/mistral/v1/chat/completions", self.mistral_chat_completions)
        app.router.add_post("/mistral/v1/embeddings", self.mistral_embeddings)
        app.router.add_post("/mistral/v1/fim/completions", self.mistral_fim_completions)
        app.router.add_get("/mistral/v1/models", self.models)
        app.router.add_post("/ollama/v1/chat/completions", self.ollama_chat_completions)
        app.router.add_post("/ollama/v1/completions", self.ollama_text_completions)
        app.router.add_post("/ollama/v1/embeddings", self.embeddings)
        app.router.add_get("/ollama/v1/models", self.models)
        app.router.add_get("/_fake/stats", self.control_stats)
        app.router.add_post("/_fake/reset", self.control_reset)
        app.router.add_get("/_fake/requests", self.control_requests)
        app.router.add_get("/__stats", self.listener_stats)
        app.router.add_post("/__control", self.listener_control)
        app.on_startup.append(self._on_startup)
        return app

    async def _on_startup(self, _app: web.Application) -> None:
        self.stopping = asyncio.Event()

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.startswith(("/_fake/", "/__")):
            return await handler(request)
        if self.fault == "refuse":
            # A connection kept alive from before the listener stopped listening: dropped unanswered, like
            # the new ones the closed port refuses, and not counted (a host that is down serves nothing).
            self._abort_now(request)
            return web.Response(status=499)
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
        request[_BODY_KEY] = body
        request[_LOG_ENTRY_KEY] = self._record(request, body)
        provider = self._provider_for(request)
        if not self._authorized(request):
            return _gemini_key_invalid() if provider == "gemini" else _status_fault(provider, 401)
        refusal = _key_refusal(_presented_key(request))
        if refusal is not None:
            if provider == "gemini" and refusal[0] == 401:
                return _gemini_key_invalid()
            if provider == "anthropic" and refusal[3] == "insufficient_quota":
                # Anthropic says an empty account in a 400, in words only.
                return _anthropic_error(400, "invalid_request_error", _ANTHROPIC_NO_CREDIT)
            return _error(provider, *refusal)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _error(provider, 404, f"Unknown path {request.path}", code="unknown_url")
        except web.HTTPMethodNotAllowed:
            return _error(provider, 405, f"Method {request.method} not allowed on {request.path}")
        except ConnectionResetError:
            # The client (llmhub) closed the connection mid-stream, as it does on a cut: a real provider sees that as
            # routine. aiohttp logged it at ERROR, which tests asserting "no error logged" took for llmhub's.
            self._closed_early(request)
            return web.Response(status=499)
        except asyncio.CancelledError:
            # The handler is cancelled when its client goes away (``handler_cancellation``), a paced reply mid-pause.
            if request.transport is None or request.transport.is_closing():
                self._closed_early(request)
            raise
        except _Aborted:
            # Nothing more may reach the client; aiohttp only needs *a* response object to finish the task.
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)

    @staticmethod
    def _provider_for(request: web.Request) -> Provider:
        if request.path.startswith("/v1/messages") or "anthropic-version" in request.headers:
            return "anthropic"
        if request.path.startswith("/v1beta/"):
            return "gemini"
        return "openai"

    def _authorized(self, request: web.Request) -> bool:
        if self.accept_keys and _presented_key(request) in self.accept_keys:
            return True
        if self.api_key is None:
            return True
        return (
            request.headers.get("authorization") == f"Bearer {self.api_key}"
            or request.headers.get("x-api-key") == self.api_key
            or request.headers.get("x-goog-api-key") == self.api_key
            or (request.path.startswith("/openai/") and request.headers.get("api-key") == self.api_key)
            or (request.path.startswith("/v1beta/") and request.query.get("key") == self.api_key)
        )

    async def _pause(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.stopping is None:
            await asyncio.sleep(seconds)
            return
        if self.stopping.is_set():
            raise _Aborted
        # Woken early by halt() so that shutdown does not wait out slow streams or long latencies. A timer and
        # a future, as asyncio.sleep is: waiting on the stopping event with asyncio.wait_for cost a task and
        # its cancellation per streamed piece, a quarter of this server's CPU at hundreds of paced streams,
        # which the benchmark's gateway shares the machine with (docs/streams.md).
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake, woken)
        self._pausing.add(woken)
        try:
            await woken
        finally:
            timer.cancel()
            self._pausing.discard(woken)
        if self.stopping.is_set():
            raise _Aborted

    async def _hang(self, request: web.Request) -> NoReturn:
        # Polling (rather than relying only on handler cancellation) also notices stop() while the
        # client is still connected, so shutdown never waits on a hung request.
        while self.stopping is not None and not self.stopping.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.05)
        self._abort(request)

    async def _cut(self, request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            # Give already-written chunks a moment to leave the buffer; abort() would discard them.
            for _ in range(20):
                if transport.is_closing() or transport.get_write_buffer_size() == 0:
                    break
                await asyncio.sleep(0.01)
        self._abort(request)

    @staticmethod
    def _abort(request: web.Request) -> NoReturn:
        _App._abort_now(request)
        raise _Aborted

    @staticmethod
    def _abort_now(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    def _timing(self, directives: dict[str, str]) -> _Timing:
        def number(name: str, default: float) -> float:
            try:
                return max(float(directives[name]), 0.0)
            except (KeyError, ValueError):
                return default

        return _Timing(
            latency=number("latency", self.latency_ms) / 1000,
            tps=number("tps", self.tps),
            ttft=number("ttft", self.ttft_ms) / 1000,
        )

    def _fault_name(self, request: web.Request, directives: dict[str, str], model: Any) -> str | None:
        """The request's own fault (header, marker, model name) before the listener's standing one."""
        header = request.headers.get("x-fake-fault")
        if header:
            named = header.strip()
        elif directives.get("fault") and not self._fault_spent(directives):
            named = directives["fault"]
        elif isinstance(model, str) and model.startswith("fault-"):
            named = model[len("fault-") :]
        elif self.fault_models is None or model in self.fault_models:
            return self.fault
        else:
            return None
        try:
            return fault_canonical(named)
        except ValueError:
            return named  # answered as an unknown fault (a 400)

    def _fault_spent(self, directives: dict[str, str]) -> bool:
        """``[[fault_times=N]]``: whether this request's marker fault has hit its N requests already (counted
        per set of directives), so that it is answered."""
        times = _directive_int(directives, "fault_times")
        if times is None:
            return False
        key = tuple(sorted(directives.items()))
        with self._lock:
            seen = self._faults_seen[key]
            self._faults_seen[key] = seen + 1
        return seen >= times

    async def _immediate_fault(
        self, request: web.Request, provider: Provider, fault: str, prompt_tokens: int, stream: bool
    ) -> web.StreamResponse | None:
        """Handle faults that do not need a reply; None means the fault is streamed (or there is none)."""
        status = _fault_status(fault)
        if status is not None:
            return _status_fault(provider, *status)
        if fault == "refuse":
            self._abort(request)
        if fault == "context":
            return _context_fault(provider, prompt_tokens)
        if fault == "hang":
            await self._hang(request)
        if re.fullmatch(r"cut-\d+", fault):
            if not stream:
                self._abort(request)
            return None
        if fault == "error-event":
            if not stream:
                return _status_fault(provider, 500)
            return None
        if fault == "drop-after-usage":
            if not stream:
                self._abort(request)
            return None
        return _error(provider, 400, f"Unknown fake fault {fault!r}")

    # -- control endpoints --

    async def control_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def control_reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def control_requests(self, _request: web.Request) -> web.Response:
        return web.json_response(self.requests())

    def _peer(self, name: str | None) -> _Listener | None:
        listener = self.listener
        if listener is None or name is None or name == self.name:
            return listener
        return listener.peers.get(name)

    async def listener_stats(self, request: web.Request) -> web.Response:
        listener = self._peer(request.query.get("upstream"))
        if listener is None:
            return web.json_response({"error": f"no upstream {request.query.get('upstream')!r}"}, status=404)
        return web.json_response(listener.describe())

    async def listener_control(self, request: web.Request) -> web.StreamResponse:
        """Change a listener's standing settings while traffic flows (see "Several upstreams")."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return web.json_response({"error": "send a JSON object"}, status=400)
        unknown = set(body) - {"upstream", "fault", "models", "latency_ms", "ttft_ms", "tps", "reset", "accept_keys"}
        if unknown:
            return web.json_response({"error": f"unknown settings {sorted(unknown)}"}, status=400)
        listener = self._peer(body.get("upstream"))
        if listener is None:
            return web.json_response({"error": f"no upstream {body.get('upstream')!r}"}, status=404)
        fault = body.get("fault", listener.app.fault)
        models = body.get("models", listener.app.fault_models if "fault" not in body else None)
        try:
            fault = fault_canonical(fault) if fault is not None else None
            models = _fault_models(fault, models)
            timing = {key: float(body[key]) for key in ("latency_ms", "ttft_ms", "tps") if key in body}
        except (TypeError, ValueError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        listener.set_timing(**timing)
        if "accept_keys" in body:
            listener.app.accept_keys = frozenset(str(key) for key in body["accept_keys"] or ())
        if body.get("reset"):
            listener.app.reset()
        if fault != "refuse" or listener is not self.listener:
            await listener.set_fault(fault, models=models)
            return web.json_response(listener.describe())
        # Refusing this very listener: the port is closed before the answer goes out (so the caller finds it
        # closed), on the one connection spared, which closes after it.
        await listener.set_fault(fault, spare=request.transport)
        response = web.json_response(listener.describe())
        response.force_close()
        return response

    # -- Azure OpenAI: OpenAI's handlers behind Azure's paths --

    @staticmethod
    def azure(
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def azure_handler(request: web.Request) -> web.StreamResponse:
            if not request.query.get("api-version"):
                return _openai_error(
                    400, "Missing required query parameter: api-version", "invalid_request_error", "missing_api_version"
                )
            deployment = request.match_info.get("deployment")
            body = request[_BODY_KEY]
            if deployment and isinstance(body, dict) and not body.get("model"):
                body["model"] = deployment
            version = request.query["api-version"]
            for name, known in (
                ("max_completion_tokens", azure_takes_max_completion_tokens),
                ("service_tier", azure_takes_service_tier),
            ):
                if isinstance(body, dict) and name in body and not known(version):
                    # As Azure: an api-version older than the field does not know it.
                    return _openai_error(
                        400, f"Unrecognized request argument supplied: {name}", "invalid_request_error", None, None
                    )
            unsaid = _TIER_UNSAID.set(isinstance(body, dict) and body.get("service_tier") is None)
            try:
                return await handler(request)
            finally:
                _TIER_UNSAID.reset(unsaid)

        return azure_handler

    # -- Mistral (OpenAI's protocol, with Mistral's own field names, and nothing else) --

    async def mistral_chat_completions(self, request: web.Request) -> web.StreamResponse:
        """Mistral's chat completions: OpenAI's answer, but a field Mistral does not take (``stream_options``,
        ``max_completion_tokens``, ``seed``, ``logprobs``, ``user``, …) or a content chunk of a type it has not (a
        ``refusal`` part) is a 422, and a stream reports its usage on its last chunk, unasked."""
        body = request[_BODY_KEY]
        refused = (
            _mistral_extra_fields(body, _MISTRAL_CHAT_FIELDS)
            or _mistral_invalid_effort(body)
            or _mistral_content_chunks(body)
        )
        if refused is not None:
            return refused
        refused = _mistral_last_role(body) or _mistral_tool_call_ids(body)
        if refused is not None:
            return refused
        request[_USAGE_ON_FINISH_KEY] = True
        last = body["messages"][-1] if isinstance(body.get("messages"), list) and body["messages"] else {}
        if isinstance(last, dict) and last.get("prefix") is True and isinstance(last.get("content"), str):
            request[_PREFIX_ECHO_KEY] = last["content"]
        if "random_seed" in body:
            request[_BODY_KEY] = {key: value for key, value in body.items() if key != "random_seed"}
        return await self.chat_completions(request)

    async def mistral_fim_completions(self, request: web.Request) -> web.StreamResponse:
        """Codestral's fill-in-the-middle (``/v1/fim/completions``): ``prompt`` (text) and ``suffix``, answered as
        Mistral's chat completions are (a ``chat.completion``, its usage on the last chunk of a stream), the reply
        and the markers read from the prompt; a field FIM does not take is a 422."""
        body = request[_BODY_KEY]
        refused = _mistral_extra_fields(body, _MISTRAL_FIM_FIELDS)
        if refused is not None:
            return refused
        if not isinstance(body.get("prompt"), str):
            return _openai_error(422, "Input should be a valid string", "invalid_request_error", None, "prompt")
        request[_USAGE_ON_FINISH_KEY] = True
        chat = {key: value for key, value in body.items() if key not in ("prompt", "suffix", "random_seed")}
        request[_BODY_KEY] = {**chat, "messages": [{"role": "user", "content": body["prompt"]}]}
        return await self.chat_completions(request)

    async def mistral_embeddings(self, request: web.Request) -> web.StreamResponse:
        """Mistral's embeddings: OpenAI's, with the size asked as ``output_dimension`` (``dimensions`` is a 422)."""
        body = request[_BODY_KEY]
        refused = _mistral_extra_fields(body, _MISTRAL_EMBEDDING_FIELDS)
        if refused is not None:
            return refused
        items = _embedding_inputs(body.get("input"))
        if items is not None and len(items) > MISTRAL_EMBED_BATCH_LIMIT:
            message = "Too many inputs in request, split into more batches."
            return _openai_error(400, message, "invalid_request_error", "3210")
        if "output_dimension" in body:
            body = {key: value for key, value in body.items() if key != "output_dimension"}
            request[_BODY_KEY] = {**body, "dimensions": request[_BODY_KEY]["output_dimension"]}
        return await self.embeddings(request)

    # -- Ollama (a subset of OpenAI's protocol; what it does not take, it ignores) --

    async def ollama_chat_completions(self, request: web.Request) -> web.StreamResponse:
        """Ollama's OpenAI-compatible chat: ``n``, ``max_completion_tokens``, ``tool_choice`` and
        ``web_search_options`` are not among the fields it reads (its ``ChatCompletionRequest``, ``openai/openai.go``),
        so it answers one choice whatever ``n`` asked, only ``max_tokens`` limits a reply, the model may call a tool
        it was given whatever ``tool_choice`` said, and it searches nothing; a content part other than text or
        image_url (a ``refusal``) is its 400 ``invalid message format``, an image URL it does not decode its 400."""
        body = request[_BODY_KEY]
        refused = _ollama_content_parts(body)
        if refused is not None:
            return refused
        if isinstance(body, dict) and _OLLAMA_IGNORED.intersection(body):
            request[_BODY_KEY] = {key: value for key, value in body.items() if key not in _OLLAMA_IGNORED}
        return await self.chat_completions(request)

    # -- models --

    async def models(self, request: web.Request) -> web.StreamResponse:
        early = await self._models_fault(request)
        if early is not None:
            return early
        if "anthropic-version" in request.headers:
            data = [self._anthropic_model(model_id, name) for model_id, name in MODELS]
            return web.json_response(
                {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]},
                headers={"request-id": _new_id("req_")},
            )
        listed = MODELS + EMBEDDING_MODELS
        return web.json_response({"object": "list", "data": [self._openai_model(model_id) for model_id, _ in listed]})

    async def model(self, request: web.Request) -> web.StreamResponse:
        early = await self._models_fault(request)
        if early is not None:
            return early
        model_id = request.match_info["model_id"]
        anthropic = "anthropic-version" in request.headers
        names = dict(MODELS if anthropic else MODELS + EMBEDDING_MODELS)
        if model_id not in names:
            if anthropic:
                return _anthropic_error(404, "not_found_error", f"model: {model_id}")
            return _openai_error(
                404, f"The model '{model_id}' does not exist", "invalid_request_error", "model_not_found", "model"
            )
        if anthropic:
            return web.json_response(self._anthropic_model(model_id, names[model_id]))
        return web.json_response(self._openai_model(model_id))

    async def _models_fault(self, request: web.Request) -> web.StreamResponse | None:
        timing = self._timing({})
        await self._pause(timing.latency)
        fault = self._fault_name(request, {}, None)
        if fault is None:
            return None
        return await self._immediate_fault(request, self._provider_for(request), fault, 0, stream=False)

    @staticmethod
    def _openai_model(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": _MODELS_CREATED, "owned_by": "fake"}

    @staticmethod
    def _anthropic_model(model_id: str, name: str) -> dict[str, Any]:
        return {
            "type": "model",
            "id": model_id,
            "display_name": name,
            "created_at": _MODELS_CREATED_RFC3339,
            "lifecycle": "active",
            "max_input_tokens": _ANTHROPIC_CONTEXT_WINDOW,
            "max_tokens": ANTHROPIC_MAX_OUTPUT_TOKENS,
        }

    # -- OpenAI chat completions --

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = request[_BODY_KEY]
        if not isinstance(body, dict):
            return _openai_error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        conv = _parse_openai(body)
        timing = self._timing(conv.directives)
        await self._pause(timing.latency)
        # ``[[stream=ignored]]``: a server that ignores ``stream: true`` answers the whole reply as JSON.
        stream = body.get("stream") is True and conv.directives.get("stream") != "ignored"
        fault = self._fault_name(request, conv.directives, body.get("model"))
        if fault is not None:
            early = await self._immediate_fault(request, "openai", fault, conv.prompt_tokens, stream)
            if early is not None:
                return early

        invalid = self._validate_openai(body)
        if invalid is not None:
            return invalid
        _logprob_said(conv.directives)
        if "raw" in conv.directives:
            return await self._raw_answer(
                request, conv.directives["raw"], stream=stream, encoding=conv.directives.get("raw_encoding")
            )
        max_tokens = _int_or_none(body.get("max_completion_tokens"))
        if max_tokens is None:
            max_tokens = _int_or_none(body.get("max_tokens"))
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
        reply = _build_reply(conv, _openai_tool(body), max_tokens, stops, "call_", self.demo)
        if request.get(_USAGE_ON_FINISH_KEY, False):  # Mistral's
            reply = reply.with_mistral_tool_ids()
        echoed = request.get(_PREFIX_ECHO_KEY)
        if echoed and reply.text is not None and conv.directives.get("prefix_echo") != "off":
            # As Mistral: the reply to a prefix begins with the prefix itself.
            reply = replace(reply, text=echoed + reply.text, tokens=[*split_tokens(echoed), *reply.tokens])
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        cached = min(_directive_int(conv.directives, "cache") or 0, conv.prompt_tokens)
        lead = _OpenAILead.of(conv, reply, mistral=request.get(_USAGE_ON_FINISH_KEY, False))
        # A request with ``web_search_options`` is answered as OpenAI's search models answer: citing what they found;
        # so is any request to one of them, which searches whether asked or not.
        searching = isinstance(body.get("web_search_options"), dict) or bool(_OPENAI_SEARCH_MODEL.search(body["model"]))
        searched = _WEB_SEARCH_SOURCE if searching else None
        annotations = _url_citations(conv.directives.get("url_citation") or searched, reply)
        completion = (reply.completion_tokens + lead.tokens) * n
        usage = {
            "prompt_tokens": conv.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": conv.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": count_words(lead.reasoning or "") * n,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        logprobs = body.get("logprobs") is True
        top = _int_or_none(body.get("top_logprobs")) or 0
        omit = frozenset(name.strip() for name in conv.directives.get("omit", "").split(",") if name.strip())
        nulls = frozenset(name.strip() for name in conv.directives.get("nulls", "").split(",") if name.strip())
        vllm_stop_reason = conv.directives.get("stop_reason") == "vllm"
        if stream:
            stream_options = body.get("stream_options")
            include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
            usage_on_finish = request.get(_USAGE_ON_FINISH_KEY, False)
            obfuscation = conv.directives.get("obfuscation", "on" if self.obfuscation else "off") == "on" and not (
                isinstance(stream_options, dict) and stream_options.get("include_obfuscation") is False
            )
            reported = include_usage or usage_on_finish
            return await self._openai_stream(
                request,
                body,
                reply,
                n,
                usage if reported and conv.directives.get("usage") != "none" else None,
                logprobs,
                top,
                timing,
                fault,
                omit,
                nulls=nulls,
                obfuscation=obfuscation,
                usage_on_finish=usage_on_finish,
                lead=lead,
                vllm_stop_reason=vllm_stop_reason,
                annotations=annotations,
                service_tier=_served_tier(body, conv.directives),
            )
        await self._pause(timing.whole_reply(len(reply.tokens)))
        answer = {
            "id": _new_id("chatcmpl-", 29),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                self._openai_choice(
                    i, reply, logprobs, top, lead, vllm_stop_reason=vllm_stop_reason, annotations=annotations
                )
                for i in range(n)
            ],
            "usage": usage,
            "service_tier": _served_tier(body, conv.directives),
            "system_fingerprint": "fp_fake",
        }
        if conv.directives.get("usage") == "none":
            del answer["usage"]
        return web.json_response(_nulled(_omitted(answer, omit), nulls), headers={"x-request-id": _new_id("req_")})

    async def _raw_answer(
        self, request: web.Request, spelt: str, *, stream: bool, encoding: str | None = None
    ) -> web.StreamResponse:
        """``[[raw=BASE64]]``: the given bytes, as they are, for a body; ``encoding`` its ``Content-Encoding``."""
        try:
            data = base64.urlsafe_b64decode(spelt + "=" * (-len(spelt) % 4))
        except ValueError:
            return _openai_error(400, "The raw marker is not URL-safe base64.", "invalid_request_error")
        headers = {"x-request-id": _new_id("req_")}
        if encoding:
            headers["Content-Encoding"] = encoding
        if not stream:
            return web.Response(body=data, content_type="application/json", headers=headers)
        response = await self._start_sse(request, headers)
        await response.write(data)
        await response.write_eof()
        return response

    @staticmethod
    def _validate_openai(body: dict[str, Any]) -> web.Response | None:
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _openai_error(400, "you must provide a model parameter", "invalid_request_error")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _openai_error(
                400, "Invalid 'messages': empty array or missing.", "invalid_request_error", "invalid_value", "messages"
            )
        n = body.get("n", 1)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128):
            return _openai_error(400, "Invalid 'n': must be between 1 and 128.", "invalid_request_error", None, "n")
        if body["model"] in OPENAI_MAX_TOKENS_REFUSED and body.get("max_tokens") is not None:
            return _openai_error(
                400,
                "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens'"
                " instead.",
                "invalid_request_error",
                "unsupported_parameter",
                "max_tokens",
            )
        refused = _openai_strict_tools(body.get("tools"))
        if refused is not None:
            return refused
        most = OPENAI_MAX_OUTPUT_TOKENS.get(body["model"])
        for name in ("max_completion_tokens", "max_tokens"):
            value = body.get(name)
            if most is not None and isinstance(value, int) and not isinstance(value, bool) and value > most:
                return _openai_error(
                    400,
                    f"{name} is too large: {value}. This model supports at most {most} completion tokens, whereas"
                    f" you provided {value}.",
                    "invalid_request_error",
                    "invalid_value",
                    name,
                )
        return None

    @staticmethod
    def _openai_tool_calls(reply: _Reply) -> list[dict[str, Any]]:
        return [
            {
                "id": tool_id,
                "type": "function",
                "function": {"name": reply.tool_name, "arguments": reply.openai_arguments},
            }
            for tool_id in reply.tool_ids
        ]

    def _openai_choice(
        self,
        index: int,
        reply: _Reply,
        logprobs: bool,
        top: int,
        lead: _OpenAILead | None = None,
        *,
        vllm_stop_reason: bool = False,
        annotations: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        content = lead.preamble if lead is not None and lead.preamble is not None else reply.text
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content,
            "refusal": None,
            "annotations": annotations or [],
        }
        if lead is not None and lead.reasoning is not None and lead.field == "content":
            message["content"] = _mistral_chunks(lead.reasoning, message["content"])
        elif lead is not None and lead.reasoning is not None:
            message[lead.field] = lead.reasoning
        if reply.legacy_function:
            message["function_call"] = {"name": reply.tool_name, "arguments": reply.openai_arguments}
        elif reply.tool_name is not None:
            message["tool_calls"] = self._openai_tool_calls(reply)
        choice = {
            "index": index,
            "message": message,
            "logprobs": {"content": [_logprob_entry(t, top) for t in reply.tokens], "refusal": None}
            if logprobs
            else None,
            "finish_reason": _openai_finish(reply),
        }
        if vllm_stop_reason:
            choice["stop_reason"] = reply.stop_sequence
        return choice

    async def _openai_stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        reply: _Reply,
        n: int,
        usage: dict[str, Any] | None,
        logprobs: bool,
        top: int,
        timing: _Timing,
        fault: str | None,
        omit: frozenset[str] = frozenset(),
        *,
        nulls: frozenset[str] = frozenset(),
        obfuscation: bool = False,
        usage_on_finish: bool = False,
        lead: _OpenAILead | None = None,
        vllm_stop_reason: bool = False,
        annotations: list[dict[str, Any]] | None = None,
        service_tier: str | None = "default",
    ) -> web.StreamResponse:
        """``usage``: reported in a chunk of its own, with no choices, after the finishes (OpenAI's
        ``include_usage``), or with ``usage_on_finish`` on the last finish chunk (Mistral's). ``lead``: the
        reasoning and the preamble streamed before the reply (each choice opens with its role alone, and a
        call after them). ``vllm_stop_reason``: each finish carries vLLM's ``stop_reason`` too. ``nulls``: the fields
        each delta says null when it lacks them (``[[nulls=...]]``)."""
        leading = lead if lead is not None and lead.present else None
        base = {
            "id": _new_id("chatcmpl-", 29),
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
            "service_tier": service_tier,
            "system_fingerprint": "fp_fake",
        }

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> dict[str, Any]:
            calls = delta.get("tool_calls")
            if reply.tool_calls_object and isinstance(calls, list) and len(calls) == 1:
                delta = {**delta, "tool_calls": calls[0]}  # older TGI's stream: the call piece, not a list of it
            data = {**base, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
            if usage is not None and not usage_on_finish:
                data["usage"] = None
            return data

        response = await self._start_sse(request, {"x-request-id": _new_id("req_")})

        async def send(data: dict[str, Any] | str) -> None:
            if isinstance(data, str):
                payload = data
            else:
                data = _nulled(_omitted(data, omit, chunk=True), nulls, chunk=True)
                if obfuscation and "error" not in data:
                    data["obfuscation"] = "".join(
                        _PADDING_RANDOM.choices(_OBFUSCATION_CHARACTERS, k=_PADDING_RANDOM.randint(1, 16))
                    )
                payload = json.dumps(data, separators=(",", ":"))
            await response.write(f"data: {payload}\n\n".encode())

        content_limit = _content_limit(fault)
        # What opens the call: the first delta of the choice, or the one after the reasoning and preamble.
        function_opening = {"function_call": {"name": reply.tool_name, "arguments": ""}}
        call = {**self._openai_tool_calls(reply)[0], "index": 0, "function": {"name": reply.tool_name, "arguments": ""}}
        tool_opening = {"tool_calls": [call]}
        for index in range(n):
            if reply.legacy_function and leading is None:
                await send(chunk(index, {"role": "assistant", "content": None, **function_opening, "refusal": None}))
            elif reply.tool_name is not None and leading is None:
                await send(chunk(index, {"role": "assistant", "content": None, **tool_opening, "refusal": None}))
            else:
                await send(chunk(index, {"role": "assistant", "content": "", "refusal": None}))

        pieces: list[dict[str, Any]] = []
        if leading is not None:
            if leading.reasoning is not None and leading.field == "content":
                pieces.extend({"content": _mistral_chunks(piece, None)} for piece in _split_pieces(leading.reasoning))
            elif leading.reasoning is not None:
                pieces.extend({leading.field: piece} for piece in _split_pieces(leading.reasoning))
            if leading.preamble is not None:
                pieces.extend({"content": token} for token in split_tokens(leading.preamble))
            if reply.legacy_function:
                pieces.append(function_opening)
            elif reply.tool_name is not None:
                pieces.append(tool_opening)
        # The arguments in pieces of text; as an object (``[[arguments=object]]``), the whole in one piece.
        argument_pieces = [reply.openai_arguments] if reply.arguments_object else _split_pieces(reply.arguments_json)
        if reply.legacy_function:
            pieces.extend({"function_call": {"arguments": piece}} for piece in argument_pieces)
        elif reply.tool_name is not None:
            # Each call's arguments in pieces; the calls after the first each open with their id and name.
            for number, tool_id in enumerate(reply.tool_ids):
                if number:
                    opening = {"index": number, "id": tool_id, "type": "function"}
                    pieces.append({"tool_calls": [{**opening, "function": {"name": reply.tool_name, "arguments": ""}}]})
                pieces.extend(
                    {"tool_calls": [{"index": number, "function": {"arguments": piece}}]} for piece in argument_pieces
                )
        elif leading is not None and leading.reasoning is not None and leading.field == "content":
            pieces.extend({"content": [{"type": "text", "text": token}]} for token in reply.tokens)
        else:
            pieces.extend({"content": token} for token in reply.tokens)
        if annotations:
            pieces.append({"annotations": annotations})
        for position, delta in enumerate(pieces):
            if content_limit is not None and position >= content_limit:
                break
            await self._pause(timing.before_piece(position))
            for index in range(n):
                lp = None
                if logprobs and "content" in delta:
                    lp = {"content": [_logprob_entry(delta["content"], top)], "refusal": None}
                await send(chunk(index, delta, lp=lp))

        if fault is not None and fault.startswith("cut-"):
            await self._cut(request)
        if fault == "error-event":
            error = {"message": "The server had an error while processing your request.", "type": "server_error"}
            await send({"error": {**error, "code": None, "param": None}})
            await response.write_eof()
            return response

        for index in range(n):
            finish = chunk(index, {}, _openai_finish(reply))
            if vllm_stop_reason:
                finish["choices"][0]["stop_reason"] = reply.stop_sequence
            if usage_on_finish and index == n - 1:
                finish["usage"] = usage
            await send(finish)
        if usage is not None and not usage_on_finish:
            await send({**base, "choices": [], "usage": usage})
        await send("[DONE]")
        await response.write_eof()
        return response

    # -- OpenAI (legacy) text completions --

    async def ollama_text_completions(self, request: web.Request) -> web.StreamResponse:
        """Ollama's ``/v1/completions``: a ``prompt`` that is one string only (its ``CompletionRequest``), and one
        choice whatever ``n`` asked."""
        body = request[_BODY_KEY]
        if isinstance(body, dict) and not isinstance(body.get("prompt"), str):
            return _openai_error(400, "invalid type for 'prompt'", "invalid_request_error", None, "prompt")
        if isinstance(body, dict) and "n" in body:
            request[_BODY_KEY] = {key: value for key, value in body.items() if key != "n"}
        return await self.text_completions(request)

    async def text_completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's legacy ``POST /v1/completions``: ``prompt`` (a string, strings, a token array or token arrays,
        one answer for each, ``n`` times), ``suffix``, ``echo``, ``logprobs`` (0 to 5), ``max_tokens`` (16 unless
        given, as OpenAI's), ``stop``; streamed as ``text_completion`` chunks. The reply and the markers are
        chat completions' (``[[reply=…]]``, ``[[words=N]]``, ``[[fault=…]]``, ``[[usage=none]]``, pacing), read
        from the prompt's last text (``[[raw=BASE64]]`` too); the echo is ``"Echo: "`` and that text. Token prompts
        count one token each."""
        body = request[_BODY_KEY]
        if not isinstance(body, dict):
            return _openai_error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        prompts = _completion_prompts(body.get("prompt"))
        texts = [prompt for prompt in prompts if isinstance(prompt, str)]
        conv = _Conversation()
        conv.user_text, conv.directives = _extract_directives(texts[-1] if texts else "")
        suffix = body.get("suffix") if isinstance(body.get("suffix"), str) else ""
        conv.prompt_tokens = count_words(suffix) + sum(
            count_words(prompt) if isinstance(prompt, str) else len(prompt) for prompt in prompts
        )
        timing = self._timing(conv.directives)
        await self._pause(timing.latency)
        stream = body.get("stream") is True and conv.directives.get("stream") != "ignored"
        fault = self._fault_name(request, conv.directives, body.get("model"))
        if fault is not None:
            early = await self._immediate_fault(request, "openai", fault, conv.prompt_tokens, stream)
            if early is not None:
                return early
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _openai_error(400, "you must provide a model parameter", "invalid_request_error")
        if "raw" in conv.directives:
            return await self._raw_answer(
                request, conv.directives["raw"], stream=stream, encoding=conv.directives.get("raw_encoding")
            )
        if not prompts:
            return _openai_error(400, "Invalid 'prompt'.", "invalid_request_error", "invalid_value", "prompt")
        if body.get("echo") is True and suffix:
            return _openai_error(
                400, "Echo is not supported with suffix.", "invalid_request_error", "invalid_value", "echo"
            )
        max_tokens = _int_or_none(body.get("max_tokens"))
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else [s for s in stop or [] if isinstance(s, str)]
        reply = _build_reply(conv, None, 16 if max_tokens is None else max_tokens, stops, "", self.demo)
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        logprobs = _int_or_none(body.get("logprobs"))
        _logprob_said(conv.directives)
        echo = body.get("echo") is True
        completion = reply.completion_tokens * n * len(prompts)
        usage = {
            "prompt_tokens": conv.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": conv.prompt_tokens + completion,
        }
        if conv.directives.get("usage") == "none":
            usage = None
        finish = _OPENAI_FINISH[reply.finish]
        base = {"id": _new_id("cmpl-", 29), "object": "text_completion", "created": int(time.time())}
        base["model"] = body["model"]
        choices = [
            (index * n + number, prompt if isinstance(prompt, str) else "")
            for index, prompt in enumerate(prompts)
            for number in range(n)
        ]
        if not stream:
            await self._pause(timing.whole_reply(len(reply.tokens)))
            answer: dict[str, Any] = {
                **base,
                "choices": [
                    {
                        "text": (prompt if echo else "") + (reply.text or ""),
                        "index": index,
                        "logprobs": _completion_logprobs(reply.tokens, logprobs),
                        "finish_reason": finish,
                    }
                    for index, prompt in choices
                ],
                "system_fingerprint": "fp_fake",
            }
            if usage is not None:
                answer["usage"] = usage
            return web.json_response(answer, headers={"x-request-id": _new_id("req_")})
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        response = await self._start_sse(request, {"x-request-id": _new_id("req_")})

        async def send(data: dict[str, Any] | str) -> None:
            payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
            await response.write(f"data: {payload}\n\n".encode())

        def chunk(index: int, text: str, finish_reason: str | None, lp: Any = None) -> dict[str, Any]:
            data = {**base, "choices": [{"text": text, "index": index, "logprobs": lp, "finish_reason": finish_reason}]}
            if include_usage:
                data["usage"] = None
            return data

        if echo:
            for index, prompt in choices:
                await send(chunk(index, prompt, None))
        content_limit = _content_limit(fault)
        for position, token in enumerate(reply.tokens):
            if content_limit is not None and position >= content_limit:
                break
            await self._pause(timing.before_piece(position))
            for index, _ in choices:
                await send(chunk(index, token, None, _completion_logprobs([token], logprobs)))
        if fault is not None and fault.startswith("cut-"):
            await self._cut(request)
        if fault == "error-event":
            error = {"message": "The server had an error while processing your request.", "type": "server_error"}
            await send({"error": {**error, "code": None, "param": None}})
            await response.write_eof()
            return response
        for index, _ in choices:
            await send(chunk(index, "", finish))
        if include_usage and usage is not None:
            await send({**base, "choices": [], "usage": usage})
        await send("[DONE]")
        await response.write_eof()
        return response

    @staticmethod
    async def _start_sse(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", **headers},
        )
        await response.prepare(request)
        return response

    # -- OpenAI embeddings --

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body = request[_BODY_KEY]
        if not isinstance(body, dict):
            return _openai_error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        items = _embedding_inputs(body.get("input"))
        directives: dict[str, str] = {}
        for item in items or ():
            if isinstance(item, str):
                directives.update(_extract_directives(item)[1])
        await self._pause(self._timing(directives).latency)
        fault = self._fault_name(request, directives, body.get("model"))
        count_text = _utf8_bytes if directives.get("count") == "bytes" else count_words
        prompt_tokens = sum(count_text(item) if isinstance(item, str) else len(item) for item in items or ())
        if fault is not None:
            early = await self._immediate_fault(request, "openai", fault, prompt_tokens, stream=False)
            if early is not None:
                return early
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _openai_error(400, "you must provide a model parameter", "invalid_request_error")
        if not items:
            return _openai_error(
                400, "'input' must be a non-empty string or array.", "invalid_request_error", "invalid_value", "input"
            )
        if "raw" in directives:
            return await self._raw_answer(request, directives["raw"], stream=False)
        dimensions = body.get("dimensions", _EMBEDDING_DIMENSIONS)
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= 4096:
            return _openai_error(
                400, "Invalid 'dimensions': expected 1 to 4096.", "invalid_request_error", "invalid_value", "dimensions"
            )
        base64_wanted = body.get("encoding_format") == "base64" and directives.get("encoding") != "float"
        data = []
        for index, item in enumerate(items):
            vector = _embedding_vector(item if isinstance(item, str) else " ".join(map(str, item)), dimensions)
            encoded: Any = base64.b64encode(vector.tobytes()).decode() if base64_wanted else vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
            if "index" in directives.get("omit", "").split(","):
                del data[-1]["index"]
        kept = _directive_int(directives, "vectors")
        if kept is not None:
            del data[kept:]
        if directives.get("order") == "reversed":
            data.reverse()
        answer: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
        if directives.get("usage") != "none":
            answer["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        return web.json_response(answer, headers={"x-request-id": _new_id("req_")})

    # -- OpenAI moderations --

    async def moderations(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/moderations``: one result per input, flagged by the ``[flag:CATEGORY]`` markers it
        holds (see Moderation in the module docstring)."""
        body = request[_BODY_KEY]
        if not isinstance(body, dict):
            return _openai_error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        items = _moderation_inputs(body.get("input"))
        directives: dict[str, str] = {}
        for item in items or ():
            directives.update(_extract_directives(item)[1])
        await self._pause(self._timing(directives).latency)
        model = body.get("model") or "omni-moderation-latest"
        fault = self._fault_name(request, directives, model)
        if fault is not None:
            early = await self._immediate_fault(request, "openai", fault, 0, stream=False)
            if early is not None:
                return early
        if not items:
            return _openai_error(
                400, "'input' must be a non-empty string or array.", "invalid_request_error", "invalid_value", "input"
            )
        results = []
        for item in items:
            read = item[:MODERATION_READ_CHARS]  # the rest of a long input is not read, as OpenAI's
            marked = {name for name in _FLAG_RE.findall(read) if name in MODERATION_CATEGORIES}
            results.append(
                {
                    "flagged": bool(marked),
                    "categories": {name: name in marked for name in MODERATION_CATEGORIES},
                    "category_scores": {name: 0.99 if name in marked else 0.0001 for name in MODERATION_CATEGORIES},
                }
            )
        answer = {"id": _new_id("modr-"), "model": model, "results": results}
        self._answered_at(request)
        return web.json_response(answer, headers={"x-request-id": _new_id("req_")})

    # -- Anthropic messages --

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = request[_BODY_KEY]
        if not isinstance(body, dict):
            return _anthropic_error(400, "invalid_request_error", "There was an issue with the JSON body.")
        conv = _parse_anthropic(body)
        timing = self._timing(conv.directives)
        await self._pause(timing.latency)
        stream = body.get("stream") is True
        fault = self._fault_name(request, conv.directives, body.get("model"))
        if fault is not None:
            early = await self._immediate_fault(request, "anthropic", fault, conv.prompt_tokens, stream)
            if early is not None:
                return early

        invalid = self._validate_anthropic(body)
        if invalid is not None:
            return invalid
        if "raw_anthropic" in conv.directives:
            return await self._raw_answer(request, conv.directives["raw_anthropic"], stream=stream)
        stops = [s for s in body.get("stop_sequences") or [] if isinstance(s, str)]
        thinking = _anthropic_thinking(body, conv.directives, demo_prompt=conv.user_text if self.demo else None)
        # As Anthropic's, ``max_tokens`` bounds the thinking and the reply together: the reply has what is left.
        room = max(0, body["max_tokens"] - (len(split_tokens(thinking)) if thinking is not None else 0))
        reply = _build_reply(conv, _anthropic_tool(body), room, stops, "toolu_", self.demo)
        cached = min(_directive_int(conv.directives, "cache") or 0, conv.prompt_tokens)
        written = min(_directive_int(conv.directives, "cache_write") or 0, conv.prompt_tokens - cached)
        written_1h = min(_directive_int(conv.directives, "cache_write_1h") or 0, written)
        usage: dict[str, Any] = {
            "input_tokens": conv.prompt_tokens - cached - written,
            "output_tokens": reply.completion_tokens,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": cached,
        }
        if written:  # which cache the writes went to, as Anthropic's usage says beside their sum
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": written - written_1h,
                "ephemeral_1h_input_tokens": written_1h,
            }
        searches = _directive_int(conv.directives, "web_search")
        if searches is not None:  # the server tools' calls, which Anthropic bills apart from the tokens
            usage["server_tool_use"] = {"web_search_requests": searches, "web_fetch_requests": 0}
        message = {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        if stream:
            return await self._anthropic_stream(request, message, reply, timing, fault, thinking)
        await self._pause(timing.whole_reply(len(reply.tokens)))
        if reply.tool_name is not None:
            content = [
                {"type": "tool_use", "id": reply.tool_id, "name": reply.tool_name, "input": reply.tool_arguments}
            ]
        else:
            content = [{"type": "text", "text": reply.text}]
        content[:0] = [block for search in _web_searches(usage) for block in search]
        if thinking is not None:
            content.insert(0, {"type": "thinking", "thinking": thinking, "signature": THINKING_SIGNATURE})
        message.update(content=content, stop_reason=_ANTHROPIC_FINISH[reply.finish], stop_sequence=reply.stop_sequence)
        return web.json_response(message, headers={"request-id": _new_id("req_")})

    async def messages_count_tokens(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's token counting: ``{"input_tokens": N}``, N the prompt tokens a Messages request of the same
        input is billed (the rule above, before any ``[[cache=N]]``), free of charge. A body with a field of the
        Messages request that counting does not take (``max_tokens``, ``stream``, the sampling parameters, ...) is
        refused as Anthropic refuses a field it does not know; a faulty model (``fault-500``, ``hang``, ...) fails
        as on ``/v1/messages``."""
        body = request[_BODY_KEY]
        if not isinstance(body, dict):
            return _anthropic_error(400, "invalid_request_error", "There was an issue with the JSON body.")
        conv = _parse_anthropic(body)
        await self._pause(self._timing(conv.directives).latency)
        fault = self._fault_name(request, conv.directives, body.get("model"))
        if fault is not None:
            early = await self._immediate_fault(request, "anthropic", fault, conv.prompt_tokens, False)
            if early is not None:
                return early
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _anthropic_error(400, "invalid_request_error", "model: Field required")
        if not isinstance(body.get("messages"), list):
            return _anthropic_error(400, "invalid_request_error", "messages: Field required")
        extra = sorted(_NOT_COUNTED & body.keys())
        if extra:
            return _anthropic_error(400, "invalid_request_error", f"{extra[0]}: Extra inputs are not permitted")
        return web.json_response({"input_tokens": conv.prompt_tokens}, headers={"request-id": _new_id("req_")})

    @staticmethod
    def _validate_anthropic(body: dict[str, Any]) -> web.Response | None:
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _anthropic_error(400, "invalid_request_error", "model: Field required")
        if not isinstance(body.get("messages"), list):
            return _anthropic_error(400, "invalid_request_error", "messages: Field required")
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            return _anthropic_error(400, "invalid_request_error", "max_tokens: Field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            return _anthropic_error(400, "invalid_request_error", "max_tokens: Input should be greater than 0")
        if max_tokens > ANTHROPIC_MAX_OUTPUT_TOKENS:
            return _anthropic_error(
                400,
                "invalid_request_error",
                f"max_tokens: {max_tokens} > {ANTHROPIC_MAX_OUTPUT_TOKENS}, which is the maximum allowed number of"
                f" output tokens for {body['model']}",
            )
        thinking = _App._validate_anthropic_thinking(body)
        if thinking is not None:
            return _anthropic_error(400, "invalid_request_error", thinking)
        marked = _anthropic_cache_controls(body)
        if marked > ANTHROPIC_MAX_CACHE_CONTROLS:
            return _anthropic_error(
                400,
                "invalid_request_error",
                f"A maximum of {ANTHROPIC_MAX_CACHE_CONTROLS} blocks with cache_control may be provided. "
                f"Found {marked}.",
            )
        misordered = _anthropic_cache_ttl_misordered(body)
        if misordered is not None:
            return _anthropic_error(400, "invalid_request_error", misordered)
        last = body["messages"][-1] if body["messages"] else None
        if isinstance(last, dict) and last.get("role") == "assistant":
            content = last.get("content")
            if isinstance(content, list) and content and isinstance(content[-1], dict):
                content = content[-1].get("text")
            if isinstance(content, str) and content != content.rstrip():
                # As Anthropic's API does: a prefill may not end in whitespace.
                return _anthropic_error(
                    400, "invalid_request_error", "final assistant content cannot end with trailing whitespace"
                )
        return None

    @staticmethod
    def _validate_anthropic_thinking(body: dict[str, Any]) -> str | None:
        """What Anthropic refuses about extended thinking: a budget under 1024 or not under ``max_tokens``; while
        thinking is on (enabled or adaptive) a temperature other than 1, a ``top_p`` under 0.95, ``top_k`` and a
        ``tool_choice`` that forces a call (``any`` or ``tool``); a thinking block sent back with another signature
        than the one it came with; and (thinking enabled) a final assistant message without its thinking first: a
        prefill, or a tool-use turn answered in this request."""
        setting = body.get("thinking")
        enabled = isinstance(setting, dict) and setting.get("type") == "enabled"
        thinking_on = isinstance(setting, dict) and setting.get("type") in ("enabled", "adaptive")
        choice = body.get("tool_choice")
        if thinking_on and isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
            return "Thinking may not be enabled when tool_choice forces tool use."
        if enabled:
            budget = setting.get("budget_tokens")
            if not isinstance(budget, int) or budget < 1024:
                return "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024"
            if budget >= body["max_tokens"]:
                return "`max_tokens` must be greater than `thinking.budget_tokens`"
        if thinking_on:
            if body.get("temperature") not in (None, 1):
                return "`temperature` may only be set to 1 when thinking is enabled or in adaptive mode"
            top_p = body.get("top_p")
            if isinstance(top_p, (int, float)) and top_p < 0.95:
                return "`top_p` must be greater than or equal to 0.95 or unset when thinking is enabled"
            if body.get("top_k") is not None:
                return "`top_k` must be unset when thinking is enabled"
        messages = body["messages"]
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for block in content:
                if (
                    isinstance(block, dict)
                    and block.get("type") == "thinking"
                    and block.get("signature") != THINKING_SIGNATURE
                ):
                    return f"messages.{i}.content: Invalid `signature` in `thinking` block"
        if enabled:
            return _App._final_assistant_thinking(messages)
        return None

    @staticmethod
    def _final_assistant_thinking(messages: list[Any]) -> str | None:
        """Anthropic's refusal, thinking enabled, of a final assistant message that does not begin with its
        thinking: a prefill (the last message), or the tool-use turn the last message answers."""
        last = len(messages) - 1
        answered = messages[last] if messages else None
        if isinstance(answered, dict) and answered.get("role") == "assistant":
            final = last
        elif (
            last >= 1
            and isinstance(answered, dict)
            and isinstance(answered.get("content"), list)
            and any(isinstance(b, dict) and b.get("type") == "tool_result" for b in answered["content"])
            and isinstance(messages[last - 1], dict)
            and messages[last - 1].get("role") == "assistant"
            and isinstance(messages[last - 1].get("content"), list)
            and any(isinstance(b, dict) and b.get("type") == "tool_use" for b in messages[last - 1]["content"])
        ):
            final = last - 1
        else:
            return None
        content = messages[final].get("content")
        first = content[0] if isinstance(content, list) and content else {"type": "text"}
        kind = first.get("type") if isinstance(first, dict) else None
        if kind in ("thinking", "redacted_thinking"):
            return None
        return (
            f"messages.{final}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{kind}`. When"
            " `thinking` is enabled, a final `assistant` message must start with a thinking block."
        )

    async def _anthropic_stream(
        self,
        request: web.Request,
        message: dict[str, Any],
        reply: _Reply,
        timing: _Timing,
        fault: str | None,
        thinking: str | None = None,
    ) -> web.StreamResponse:
        response = await self._start_sse(request, {"request-id": _new_id("req_")})

        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode())

        usage = message["usage"]
        # As Anthropic's: the server tools' calls are counted in ``message_delta``'s usage, at 0 before.
        started = {**usage, "output_tokens": 1}
        if "server_tool_use" in usage:
            started["server_tool_use"] = {name: 0 for name in usage["server_tool_use"]}
        await send("message_start", {"type": "message_start", "message": {**message, "usage": started}})
        if reply.tool_name is not None:
            block = {"type": "tool_use", "id": reply.tool_id, "name": reply.tool_name, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": p} for p in _split_pieces(reply.arguments_json)]
        else:
            block = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": token} for token in reply.tokens]
        index = 0
        if thinking is not None:  # extended thinking: its block first, then the reply's
            start = {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}
            await send("content_block_start", start)
            for piece in _split_pieces(thinking):
                delta = {"type": "thinking_delta", "thinking": piece}
                await send("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            delta = {"type": "signature_delta", "signature": THINKING_SIGNATURE}
            await send("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            await send("content_block_stop", {"type": "content_block_stop", "index": 0})
            index = 1
        for call, result in _web_searches(usage):  # each search's call, then its results, before the reply
            start = {"type": "content_block_start", "index": index, "content_block": {**call, "input": {}}}
            await send("content_block_start", start)
            delta = {"type": "input_json_delta", "partial_json": json.dumps(call["input"])}
            await send("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
            start = {"type": "content_block_start", "index": index + 1, "content_block": result}
            await send("content_block_start", start)
            await send("content_block_stop", {"type": "content_block_stop", "index": index + 1})
            index += 2
        await send("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
        await send("ping", {"type": "ping"})

        content_limit = _content_limit(fault)
        for position, delta in enumerate(deltas):
            if content_limit is not None and position >= content_limit:
                break
            await self._pause(timing.before_piece(position))
            await send("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

        if fault is not None and fault.startswith("cut-"):
            await self._cut(request)
        if fault == "error-event":
            await send("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
            await response.write_eof()
            return response

        await send("content_block_stop", {"type": "content_block_stop", "index": index})
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _ANTHROPIC_FINISH[reply.finish], "stop_sequence": reply.stop_sequence},
                "usage": {
                    "output_tokens": usage["output_tokens"],
                    **({"server_tool_use": usage["server_tool_use"]} if "server_tool_use" in usage else {}),
                },
            },
        )
        if fault == "drop-after-usage":
            await self._cut(request)
        await send("message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response

    # -- Google Gemini (generativelanguage v1beta) --

    async def gemini_models(self, request: web.Request) -> web.StreamResponse:
        early = await self._models_fault(request)
        if early is not None:
            return early
        models = [
            {
                "name": f"models/{model_id}",
                "displayName": name,
                "inputTokenLimit": _GEMINI_CONTEXT_WINDOW,
                "outputTokenLimit": 65_536,
                "supportedGenerationMethods": ["generateContent", "countTokens"],
            }
            for model_id, name in MODELS
        ]
        models.append(
            {
                "name": "models/fake-gemini-embedding",
                "displayName": "Fake Gemini embedding",
                "supportedGenerationMethods": ["embedContent"],
            }
        )
        return web.json_response({"models": models})

    async def gemini_model_action(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["model_action"].partition(":")
        body = request[_BODY_KEY]
        if not isinstance(body, dict):
            return _gemini_error(400, "Invalid JSON payload received.")
        if action == "batchEmbedContents":
            return await self._gemini_embed(request, model, body)
        if action not in ("generateContent", "streamGenerateContent"):
            return _gemini_error(404, f"Method {action!r} not found for models/{model}.")
        stream = action == "streamGenerateContent"
        conv = _parse_gemini(body)
        timing = self._timing(conv.directives)
        await self._pause(timing.latency)
        fault = self._fault_name(request, conv.directives, model)
        if fault is not None:
            early = await self._immediate_fault(request, "gemini", fault, conv.prompt_tokens, stream)
            if early is not None:
                return early
        if not body.get("contents"):
            return _gemini_error(400, "* GenerateContentRequest.contents: contents is not specified")
        if "raw_gemini" in conv.directives:
            return await self._raw_answer(request, conv.directives["raw_gemini"], stream=stream)
        config = body.get("generationConfig") or {}
        candidates = config.get("candidateCount", 1)
        if type(candidates) is not int or not 1 <= candidates <= _GEMINI_MAX_CANDIDATES:
            return _gemini_error(
                400,
                "* GenerateContentRequest.generation_config.candidate_count: "
                f"must be between 1 and {_GEMINI_MAX_CANDIDATES}.",
            )
        refused = _gemini_thinking_refused(model, config)
        if refused is not None:
            return refused
        stop = config.get("stopSequences") or []
        reply = _build_reply(
            conv, _gemini_tool(body), _int_or_none(config.get("maxOutputTokens")), list(stop), "", self.demo
        )
        cached = min(_directive_int(conv.directives, "cache") or 0, conv.prompt_tokens)
        completion_tokens = reply.completion_tokens * candidates  # Google counts every candidate's tokens
        usage = {
            "promptTokenCount": conv.prompt_tokens,
            "candidatesTokenCount": completion_tokens,
            "totalTokenCount": conv.prompt_tokens + completion_tokens,
        }
        if cached:
            usage["cachedContentTokenCount"] = cached
        thought = _gemini_thought(config, conv.directives)
        if thought is not None:
            usage["thoughtsTokenCount"] = count_words(thought) * candidates
            usage["totalTokenCount"] += usage["thoughtsTokenCount"]
        response_id = _new_id("")
        safety = conv.directives.get("safety")
        if safety == "prompt":
            blocked = {
                "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
                "usageMetadata": {"promptTokenCount": conv.prompt_tokens, "totalTokenCount": conv.prompt_tokens},
                "modelVersion": model,
                "responseId": response_id,
            }
            if stream:
                return await self._gemini_sse(request, [blocked], None)
            return web.json_response(blocked)
        if safety == "response":
            reply = _Reply(text=None, tokens=[], finish="stop")
        finish = "SAFETY" if safety == "response" else _GEMINI_FINISH[reply.finish]
        if reply.tool_name is not None:
            parts: list[list[dict[str, Any]]] = [
                [{"functionCall": {"name": reply.tool_name, "args": reply.tool_arguments}}] * reply.tool_count
            ]
        elif reply.text is None:
            parts = [[]]
        elif stream:
            parts = [[{"text": piece}] for piece in reply.tokens] or [[{"text": ""}]]
        else:
            parts = [[{"text": reply.text}]]
        if thought is not None and _gemini_includes_thoughts(config):
            # The thought summary first: whole, before the answer's parts; streamed, in pieces of its own.
            if stream:
                parts[:0] = [[{"text": piece, "thought": True}] for piece in _split_pieces(thought)]
            else:
                parts[0].insert(0, {"text": thought, "thought": True})
        # responseLogprobs: each candidate's chosen tokens, with ``logprobs`` alternatives at each step.
        logprobs = None
        if config.get("responseLogprobs") is True:
            logprobs = _int_or_none(config.get("logprobs")) or 0
        chunks = []
        for index, chunk_parts in enumerate(parts):
            # Each candidate (``candidateCount``) has its own ``index``; a streamed chunk carries the next
            # piece of every one, the last its finish.
            chunk: dict[str, Any] = {"candidates": [], "modelVersion": model, "responseId": response_id}
            for number in range(candidates):
                candidate: dict[str, Any] = {"index": number}
                if chunk_parts:
                    candidate["content"] = {"role": "model", "parts": copy.deepcopy(chunk_parts)}
                    tokens = [part["text"] for part in chunk_parts if "text" in part] if stream else reply.tokens
                    if logprobs is not None and tokens and reply.tool_name is None:
                        candidate["logprobsResult"] = _gemini_logprobs(tokens, logprobs)
                if index == len(parts) - 1:
                    candidate["finishReason"] = finish
                    if finish == "SAFETY":
                        candidate["safetyRatings"] = [
                            {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
                        ]
                chunk["candidates"].append(candidate)
            if index == len(parts) - 1 and conv.directives.get("usage") != "none":
                chunk["usageMetadata"] = usage
            chunks.append(chunk)
        if not stream:
            return web.json_response(chunks[0])
        return await self._gemini_sse(request, chunks, fault, timing)

    async def _gemini_sse(
        self, request: web.Request, chunks: list[dict[str, Any]], fault: str | None, timing: _Timing | None = None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        limit = _content_limit(fault)
        for index, chunk in enumerate(chunks):
            if limit is not None and index >= limit:
                if fault == "error-event":
                    error = {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}}
                    await response.write(b"data: " + json.dumps(error).encode() + b"\r\n\r\n")
                    await response.write_eof()
                    return response
                await self._cut(request)
            if timing is not None and index == 0:
                await self._pause(timing.ttft)
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n")
            if timing is not None:
                await self._pause(timing.token_delay)
        await response.write_eof()
        return response

    async def _gemini_embed(self, request: web.Request, model: str, body: dict[str, Any]) -> web.StreamResponse:
        requests = body.get("requests")
        texts = []
        for item in requests if isinstance(requests, list) else []:
            parts = ((item or {}).get("content") or {}).get("parts") or []
            texts.append(" ".join(p.get("text", "") for p in parts if isinstance(p, dict)))
        directives: dict[str, str] = {}
        for text in texts:
            directives.update(_extract_directives(text)[1])
        await self._pause(self._timing(directives).latency)
        fault = self._fault_name(request, directives, model)
        if fault is not None:
            early = await self._immediate_fault(request, "gemini", fault, sum(map(count_words, texts)), stream=False)
            if early is not None:
                return early
        if not texts or not all(texts):
            return _gemini_error(400, "* BatchEmbedContentsRequest.requests: content is not specified")
        if len(texts) > GEMINI_EMBED_BATCH_LIMIT:
            limit = GEMINI_EMBED_BATCH_LIMIT
            message = f"* BatchEmbedContentsRequest.requests: at most {limit} requests can be in one batch"
            return _gemini_error(400, message)
        embeddings = []
        for item, text in zip(requests, texts, strict=True):
            dimensions = item.get("outputDimensionality") or _EMBEDDING_DIMENSIONS
            # Another task type, another vector, as Gemini's (none named: the OpenAI route's vector).
            kind = "\0" + str(item["taskType"]) if item.get("taskType") else ""
            embeddings.append({"values": _embedding_vector(text + kind, int(dimensions)).tolist()})
        return web.json_response({"embeddings": embeddings})


def _embedding_inputs(value: Any) -> list[str | list[int]] | None:
    """The inputs of an embeddings request, one per vector; None when ``value`` is not a valid input."""
    if isinstance(value, str):
        return [value] if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return [value]
    if all(isinstance(item, str) and item for item in value):
        return list(value)
    if all(
        isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        for item in value
    ):
        return list(value)
    return None


def _moderation_inputs(value: Any) -> list[str] | None:
    """The texts of a moderation request's ``input``: a string, a list of strings, or a list of parts (the
    text parts; images are not judged here)."""
    if isinstance(value, str):
        return [value] if value else None
    if not isinstance(value, list) or not value:
        return None
    texts: list[str] = []
    for item in value:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            texts.append(item["text"])
        elif not (isinstance(item, dict) and item.get("type") == "image_url"):
            return None
    return texts or None


def _embedding_vector(text: str, dimensions: int) -> array.array:
    """A unit-length float32 vector from the SHA-256 of ``text`` (the digest of ``text`` and a block number,
    as many blocks as the dimensions need, each pair of bytes one number in [-1, 1))."""
    raw = b"".join(hashlib.sha256(f"{block}:{text}".encode()).digest() for block in range(-(-dimensions * 2 // 32)))
    numbers = [(int.from_bytes(raw[2 * i : 2 * i + 2], "little") - 32768) / 32768 for i in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in numbers)) or 1.0
    little_endian = array.array("f", (x / norm for x in numbers))
    if sys.byteorder == "big":
        little_endian.byteswap()
    return little_endian


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    """A text completion's ``prompt`` as the prompts it holds: a string, a token array, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, list) or not prompt:
        return []
    if all(isinstance(item, int) and not isinstance(item, bool) for item in prompt):
        return [prompt]
    return [item for item in prompt if isinstance(item, str | list)]


def _completion_logprobs(tokens: list[str], top: int | None) -> dict[str, Any] | None:
    """A text completion choice's ``logprobs`` for ``tokens`` (``logprobs: N``: N alternatives a step), or None."""
    if top is None:
        return None
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "tokens": list(tokens),
        "token_logprobs": [_logprob(token) for token in tokens],
        "top_logprobs": [
            {token: _logprob(token), **{f" alt{i}": _logprob(token) - i for i in range(1, top)}} for token in tokens
        ],
        "text_offset": offsets,
    }


# The service tiers OpenAI answers it served a request at (``service_tier`` of the reply and of each chunk).
_SERVED_TIERS = frozenset({"default", "flex", "priority"})


def _served_tier(body: dict[str, Any], directives: dict[str, str]) -> str | None:
    """The tier the reply says it was served at: the one asked, if OpenAI serves it; for ``auto`` or none the
    project's default (``[[project_tier=NAME]]``: an Azure deployment's own tier), else ``default``;
    ``[[served_tier=NAME]]``: NAME, whatever was asked. None (no tier said): Azure's reply to a request that set none
    (``_TIER_UNSAID``)."""
    if "served_tier" in directives:
        return directives["served_tier"]
    if _TIER_UNSAID.get():
        return None
    asked = body.get("service_tier")
    if asked in _SERVED_TIERS:
        return asked
    project = directives.get("project_tier", "default")
    return project if project in _SERVED_TIERS else "default"


def _directive_int(directives: dict[str, str], name: str) -> int | None:
    value = directives.get(name, "")
    return int(value) if value.isdigit() else None


def _content_limit(fault: str | None) -> int | None:
    if fault is None:
        return None
    if fault == "error-event":
        return _ERROR_EVENT_CHUNKS
    match = re.fullmatch(r"cut-(\d+)", fault)
    return int(match.group(1)) if match else None


# --------------------------------------------------------------------------------------------------------------
# Running it


# --------------------------------------------------------------------------------------------------------------
# Google Gemini's wire format (``POST /v1beta/models/{model}:generateContent`` and friends)

_GEMINI_CONTEXT_WINDOW = 1_048_576
_GEMINI_MAX_CANDIDATES = 8  # generationConfig.candidateCount, as the Gemini 2.x models take it
# A Pro model since 2.5 (``gemini-2.5-pro``, ``gemini-2.5-pro-preview-06-05``, ``gemini-3-pro-preview``), which always
# thinks: Google refuses a ``thinkingBudget`` of 0 for it (``_gemini_thinking_refused``).
_GEMINI_ALWAYS_THINKS = re.compile(r"gemini-(?P<version>\d+(?:\.\d+)?)-pro(?:-|$)")
_GEMINI_FINISH: dict[str, str] = {"stop": "STOP", "stop_sequence": "STOP", "length": "MAX_TOKENS", "tool": "STOP"}
_GEMINI_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_GEMINI_FAULT_MESSAGES: dict[int, str] = {
    401: "API key not valid. Please pass a valid API key.",
    429: "Resource has been exhausted (e.g. check quota).",
    500: "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
    503: "The model is overloaded. Please try again later.",
}


def _gemini_error(status: int, message: str, details: list[dict[str, Any]] | None = None) -> web.Response:
    """Google's error shape: ``{"error": {"code", "message", "status"[, "details"]}}``."""
    status_name = _GEMINI_STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
    error: dict[str, Any] = {"code": status, "message": message, "status": status_name}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status)


def _gemini_thinking_refused(model: str, config: dict[str, Any]) -> web.Response | None:
    """Google's 400 for a ``thinkingBudget`` of 0 (thinking off) asked of a Pro model since 2.5, which only thinks;
    None for a request it takes (a Flash model's 0 turns its thinking off)."""
    thinking = config.get("thinkingConfig") if isinstance(config.get("thinkingConfig"), dict) else {}
    if thinking.get("thinkingBudget", thinking.get("thinking_budget")) != 0:
        return None
    pro = _GEMINI_ALWAYS_THINKS.match(model)
    if pro is None or float(pro["version"]) < 2.5:
        return None
    return _gemini_error(400, "Budget 0 is invalid. This model only works in thinking mode.")


def _gemini_key_invalid() -> web.Response:
    """Google's answer to an API key it does not know: not a 401 but a 400 INVALID_ARGUMENT, the key's
    refusal said only by the ``API_KEY_INVALID`` reason of its ErrorInfo detail."""
    info = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }
    return _gemini_error(400, "API key not valid. Please pass a valid API key.", details=[info])


def _parse_gemini(body: dict[str, Any]) -> _Conversation:
    conv = _Conversation()
    system = body.get("systemInstruction") or {}
    tally = _Tally()
    for part in system.get("parts") or [] if isinstance(system, dict) else []:
        if isinstance(part, dict):
            tally.text(part.get("text"))
    conv.prompt_tokens += tally.tokens if tally.words else 0
    user_text: str | None = None
    last: dict[str, Any] = {}
    for content in body.get("contents") or []:
        if not isinstance(content, dict):
            continue
        last = content
        tally = _Tally()
        texts = []
        for part in content.get("parts") or []:
            if not isinstance(part, dict):
                continue
            if isinstance(part.get("text"), str):
                tally.text(part["text"])
                texts.append(part["text"])
            elif "inlineData" in part or "fileData" in part:
                tally.images += 1
                texts.append("[image]")
            elif isinstance(part.get("functionCall"), dict):
                tally.text(json.dumps(part["functionCall"].get("args") or {}))
            elif isinstance(part.get("functionResponse"), dict):
                tally.text(json.dumps(part["functionResponse"].get("response") or {}))
        conv.prompt_tokens += tally.tokens
        if content.get("role", "user") == "user" and texts:
            user_text = " ".join(texts)
    responses = [
        part["functionResponse"]
        for part in last.get("parts") or []
        if isinstance(part, dict) and isinstance(part.get("functionResponse"), dict)
    ]
    if responses:
        result = responses[-1].get("response")
        conv.tool_result = json.dumps(result) if not isinstance(result, str) else result
        if isinstance(result, dict) and set(result) <= {"output", "result", "content"} and len(result) == 1:
            value = next(iter(result.values()))
            conv.tool_result = value if isinstance(value, str) else json.dumps(value)
    conv.last_is_user = last.get("role", "user") == "user" and not responses
    conv.user_text, conv.directives = _extract_directives(user_text or "")
    return conv


def _gemini_tool(body: dict[str, Any]) -> _ToolSpec | None:
    mode_config = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    if mode_config.get("mode") == "NONE":
        return None
    declarations = [
        declaration
        for tool in body.get("tools") or []
        if isinstance(tool, dict)
        for declaration in tool.get("functionDeclarations") or []
        if isinstance(declaration, dict) and declaration.get("name")
    ]
    allowed = mode_config.get("allowedFunctionNames") or []
    declarations = [d for d in declarations if d["name"] in allowed] or declarations if allowed else declarations
    if not declarations:
        return None
    # Google's JSON parser takes a field's proto name (snake_case) as well as its camelCase one.
    declaration = declarations[0]
    schema = (
        declaration.get("parameters")
        or declaration.get("parametersJsonSchema")
        or declaration.get("parameters_json_schema")
        or {}
    )
    return _ToolSpec(declaration["name"], _lower_types(schema))


def _lower_types(schema: Any) -> Any:
    """Gemini's schema spells types in capitals (``STRING``); the reply builder reads JSON schema's."""
    if isinstance(schema, dict):
        return {k: (v.lower() if k == "type" and isinstance(v, str) else _lower_types(v)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_lower_types(item) for item in schema]
    return schema


# --------------------------------------------------------------------------------------------------------------
# Running it: one or several listeners, each an upstream of its own, on one event loop


@dataclass(frozen=True)
class UpstreamSpec:
    """One listener: its name, port (0: any free one), timing and standing fault (any spelling that
    ``fault_canonical`` reads; ``refuse`` starts it closed)."""

    name: str = "upstream"
    port: int = 0
    latency_ms: float = 0
    ttft_ms: float = 0
    tps: float = 0
    fault: str | None = None
    api_key: str | None = None
    demo: bool = False
    obfuscation: bool = False


class _Listener:
    """An ``_App`` on its own port, which it can stop listening on (``refuse``) and take up again."""

    def __init__(self, spec: UpstreamSpec, host: str, peers: dict[str, _Listener]) -> None:
        self.name = spec.name
        self.host = host
        self.port = spec.port
        self.peers = peers
        self.app = _App(latency_ms=spec.latency_ms, tps=spec.tps, api_key=spec.api_key, demo=spec.demo, name=spec.name)
        self.app.ttft_ms = spec.ttft_ms
        self.app.obfuscation = spec.obfuscation
        self.app.listener = self
        self.spec = spec
        self._initial_fault = fault_canonical(spec.fault) if spec.fault else None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def announcement(self) -> str:
        named = "" if self.name == UpstreamSpec.name else f" {self.name}"
        return f"fake upstream{named} listening on {self.base_url}"

    def describe(self) -> dict[str, Any]:
        return {**self.app.settings(), "port": self.port, "listening": self._site is not None, **self.app.stats()}

    def set_timing(
        self, *, latency_ms: float | None = None, ttft_ms: float | None = None, tps: float | None = None
    ) -> None:
        if latency_ms is not None:
            self.app.latency_ms = max(latency_ms, 0.0)
        if ttft_ms is not None:
            self.app.ttft_ms = max(ttft_ms, 0.0)
        if tps is not None:
            self.app.tps = max(tps, 0.0)

    async def start(self) -> None:
        # handler_cancellation: a client that goes away mid-stream (or mid-hang) should end its handler at once.
        self._runner = web.AppRunner(
            self.app.build(), access_log=None, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_TIMEOUT
        )
        await self._runner.setup()
        await self._listen()
        await self.set_fault(self._initial_fault)

    async def _listen(self) -> None:
        assert self._runner is not None
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._site = site
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def set_fault(
        self,
        fault: str | None,
        *,
        models: frozenset[str] | None = None,
        spare: asyncio.BaseTransport | None = None,
    ) -> None:
        """``fault`` (canonical) becomes the standing fault, for requests naming ``models`` only when given.
        ``refuse`` closes the port and drops the open connections (but ``spare``, the one asking); any other
        value opens the port again if it was closed."""
        self.app.fault = fault
        self.app.fault_models = models
        if fault == "refuse":
            if self._site is not None:
                site, self._site = self._site, None
                await site.stop()
            assert self._runner is not None and self._runner.server is not None
            for connection in list(self._runner.server.connections):
                transport = connection.transport
                if transport is not None and transport is not spare:
                    transport.abort()
        elif self._site is None:
            await self._listen()

    async def restore(self) -> None:
        """Back to how it started: its timing and standing fault as its spec gave them."""
        self.set_timing(latency_ms=self.spec.latency_ms, ttft_ms=self.spec.ttft_ms, tps=self.spec.tps)
        await self.set_fault(self._initial_fault)

    async def stop(self) -> None:
        if self._runner is None:
            return
        self.app.halt()
        await self._runner.cleanup()
        self._runner = self._site = None


class UpstreamHandle:
    """A test's hold on one listener of a ``FakeUpstreams`` running in its thread. Every method may be called
    from any thread, an async test's included: it waits for the upstream's own loop to do the work."""

    def __init__(self, group: FakeUpstreams, listener: _Listener) -> None:
        self._group = group
        self._listener = listener

    def __repr__(self) -> str:
        return f"<UpstreamHandle {self.name} {self.base_url} fault={self.fault!r}>"

    @property
    def name(self) -> str:
        return self._listener.name

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def base_url(self) -> str:
        return self._listener.base_url

    @property
    def fault(self) -> str | None:
        return self._listener.app.fault

    def set_fault(self, fault: str | None, *, models: Sequence[str] | None = None) -> None:
        """A standing fault for every request that names none itself (``None`` heals; ``refuse`` closes the
        port); any spelling ``fault_canonical`` reads. ``models``: only for requests naming these upstream
        model ids (one model down at a provider that serves others)."""
        canonical = fault_canonical(fault) if fault is not None else None
        self._group._run(self._listener.set_fault(canonical, models=_fault_models(canonical, models)))

    def refuse(self) -> None:
        """Stop listening: new connections are refused, open ones dropped."""
        self.set_fault("refuse")

    def accept(self) -> None:
        """Listen again (and drop any standing fault)."""
        self.set_fault(None)

    def set_timing(
        self, *, latency_ms: float | None = None, ttft_ms: float | None = None, tps: float | None = None
    ) -> None:
        self._listener.set_timing(latency_ms=latency_ms, ttft_ms=ttft_ms, tps=tps)

    def accept_keys(self, *keys: str) -> None:
        """Accept these keys besides the listener's own (users' own keys); none: only its own again."""
        self._listener.app.accept_keys = frozenset(keys)

    def requests_served(self, path: str | None = None) -> int:
        """Requests that reached this listener (control endpoints and refused connections not counted),
        or those on ``path``."""
        stats = self._listener.app.stats()
        return stats["requests"] if path is None else stats["by_path"].get(path, 0)

    @property
    def stats(self) -> dict[str, Any]:
        return self._listener.describe()

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self._listener.app.requests()

    def reset(self) -> None:
        """Counters and request log to zero; the standing fault and timing stay."""
        self._listener.app.reset()


class FakeUpstreams:
    """Several fake upstreams, one listener each, served from one background thread with its own event loop.

    ::

        with FakeUpstreams([UpstreamSpec("east"), UpstreamSpec("west", latency_ms=50)]) as upstreams:
            upstreams["east"].refuse()
            ...
            assert upstreams["west"].requests_served() == 3
    """

    def __init__(self, specs: Sequence[UpstreamSpec], host: str = "127.0.0.1") -> None:
        names = [spec.name for spec in specs]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"give one or more upstreams with distinct names, not {names}")
        self.host = host
        peers: dict[str, _Listener] = {}
        for spec in specs:
            peers[spec.name] = _Listener(spec, host, peers)
        self._listeners = list(peers.values())
        self.handles = [UpstreamHandle(self, listener) for listener in self._listeners]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __getitem__(self, key: int | str) -> UpstreamHandle:
        if isinstance(key, str):
            return next(handle for handle in self.handles if handle.name == key)
        return self.handles[key]

    def __iter__(self) -> Iterator[UpstreamHandle]:
        return iter(self.handles)

    def __len__(self) -> int:
        return len(self.handles)

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the fake upstreams are not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        async def boot() -> None:
            for listener in self._listeners:
                await listener.start()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(boot())
            except BaseException as exc:  # handed over to the thread that called start()
                failure.append(exc)
                with contextlib.suppress(Exception):
                    loop.run_until_complete(self._stop_listeners())
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fake-upstream", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._loop = self._thread = None
            raise failure[0]
        for listener in self._listeners:
            logger.info("%s", listener.announcement())
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            future = asyncio.run_coroutine_threadsafe(self._stop_listeners(), loop)
            with contextlib.suppress(Exception):
                future.result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None

    async def _stop_listeners(self) -> None:
        for listener in self._listeners:
            await listener.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


class FakeUpstream(FakeUpstreams):
    """One fake upstream (the common case): ``FakeUpstreams`` with a single listener, whose handle's methods
    it has too."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_ms: float = 0,
        tps: float = 0,
        api_key: str | None = None,
        demo: bool = False,
    ) -> None:
        super().__init__([UpstreamSpec(port=port, latency_ms=latency_ms, tps=tps, api_key=api_key, demo=demo)], host)

    @property
    def port(self) -> int:
        return self.handles[0].port

    @property
    def base_url(self) -> str:
        return self.handles[0].base_url

    @property
    def stats(self) -> dict[str, Any]:
        return self._listeners[0].app.stats()

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.handles[0].requests

    def reset(self) -> None:
        """Counters and request log to zero, and (a server shared by tests starts each clean) its standing
        fault and timing back to the constructor's."""
        self.handles[0].reset()
        self._run(self._listeners[0].restore())

    def set_fault(self, fault: str | None, *, models: Sequence[str] | None = None) -> None:
        self.handles[0].set_fault(fault, models=models)

    def refuse(self) -> None:
        self.handles[0].refuse()

    def accept(self) -> None:
        self.handles[0].accept()

    def accept_keys(self, *keys: str) -> None:
        self.handles[0].accept_keys(*keys)

    def requests_served(self, path: str | None = None) -> int:
        return self.handles[0].requests_served(path)


def parse_upstream(text: str, defaults: UpstreamSpec) -> UpstreamSpec:
    """``--upstream`` of the command line: ``NAME=PORT`` then ``,KEY=VALUE`` settings (``latency_ms``,
    ``ttft_ms``, ``tps``, ``fault``); ``fault=`` comes last and takes the rest (it may hold commas)."""
    head, _, rest = text.partition(",")
    name, sep, port = head.partition("=")
    if not sep or not name.strip() or not port.strip().isdigit():
        raise ValueError(f"--upstream {text!r}: start with NAME=PORT, e.g. east=18080")
    settings: dict[str, Any] = {"name": name.strip(), "port": int(port)}
    while rest:
        if rest.startswith("fault="):
            settings["fault"] = fault_canonical(rest.removeprefix("fault="))
            break
        item, _, rest = rest.partition(",")
        key, sep, value = item.partition("=")
        if not sep or key not in ("latency_ms", "ttft_ms", "tps"):
            raise ValueError(f"--upstream {text!r}: unknown setting {item!r} (latency_ms, ttft_ms, tps, fault)")
        settings[key] = float(value)
    return replace(defaults, **settings)


async def _serve_forever(specs: Sequence[UpstreamSpec], host: str) -> None:
    peers: dict[str, _Listener] = {}
    for spec in specs:
        peers[spec.name] = _Listener(spec, host, peers)
    try:
        for listener in peers.values():
            await listener.start()
            logger.info("%s", listener.announcement())
        await asyncio.Event().wait()
    finally:
        for listener in peers.values():
            await listener.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Deterministic fake OpenAI/Anthropic upstream(s).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18080, help="the one listener's port, without --upstream")
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="NAME=PORT[,latency_ms=MS][,ttft_ms=MS][,tps=N][,fault=SPEC]",
        help="a listener of its own (repeat for several, all in this process); the other options are defaults",
    )
    parser.add_argument("--latency-ms", type=float, default=0, help="delay before every answer")
    parser.add_argument("--ttft-ms", type=float, default=0, help="further delay before the first token")
    parser.add_argument("--tps", type=float, default=0, help="streamed tokens per second; 0 means no delay")
    parser.add_argument("--api-key", default=None, help="require this key; any key is accepted when unset")
    parser.add_argument(
        "--demo", action="store_true", help="answer with canned Markdown replies instead of the echo (make run)"
    )
    parser.add_argument(
        "--obfuscation", action="store_true", help="pad every streamed OpenAI chunk as OpenAI does (obfuscation)"
    )
    args = parser.parse_args(argv)
    defaults = UpstreamSpec(
        port=args.port,
        latency_ms=args.latency_ms,
        ttft_ms=args.ttft_ms,
        tps=args.tps,
        api_key=args.api_key,
        demo=args.demo,
        obfuscation=args.obfuscation,
    )
    try:
        specs = [parse_upstream(text, defaults) for text in args.upstream] or [defaults]
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(specs, args.host))


if __name__ == "__main__":
    main()
