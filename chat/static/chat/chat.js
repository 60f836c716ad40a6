/* The chat page: conversations over REST, replies over the /ws/chat/ WebSocket.

   Model output is untrusted. It is rendered as Markdown by marked with raw HTML escaped (shown as text)
   and images turned into links (no request leaves the page on the model's say-so), then sanitized by
   DOMPurify into a DOM fragment. Nothing the model wrote reaches innerHTML unsanitized. */
(function () {
  "use strict";

  const { api, copyWithFeedback, formatDate } = window.llmhub;

  const MODELS = JSON.parse(document.getElementById("models-data").textContent);
  const INITIAL_CONVERSATION = JSON.parse(document.getElementById("conversation-id").textContent);
  const PING_INTERVAL_MS = 25000;
  const RECONNECT_MAX_MS = 15000;
  const STABLE_AFTER_MS = 10000;
  const MODEL_STORAGE_KEY = "llmhub.model";
  // A message in the box when the session ended, kept across the sign-in form for the page it was typed on.
  const DRAFT_STORAGE_KEY = "llmhub.draft";
  // The socket's close codes after which reconnecting cannot help (chat/consumers.py): signed out, and a role
  // that may not chat (a user made a viewer), which every new socket is refused for too.
  const CLOSE_UNAUTHENTICATED = 4401;
  const CLOSE_FORBIDDEN = 4403;

  const $ = (id) => document.getElementById(id);
  const el = {
    sidebar: $("sidebar"),
    sidebarToggle: $("sidebar-toggle"),
    scrim: $("sidebar-scrim"),
    newChat: $("new-chat"),
    convList: $("conversation-list"),
    convEmpty: $("conversation-empty"),
    convMore: $("conversation-more"),
    announcer: $("reply-announcer"),
    picker: $("model-picker"),
    badge: $("provider-badge"),
    effortControl: $("reasoning-control"),
    effort: $("reasoning-effort"),
    conn: $("connection-status"),
    messages: $("messages"),
    emptyState: $("empty-state"),
    composer: $("composer"),
    prompt: $("prompt"),
    composerError: $("composer-error"),
    send: $("send"),
    stop: $("stop"),
  };

  // The longest message the socket takes (chat/consumers.py's MAX_CONTENT_CHARS), in characters as the server counts
  // them: code points, where JavaScript's length counts a character outside the BMP (an emoji) twice.
  const MAX_CONTENT_CHARS = Number(el.prompt.dataset.maxChars) || 100000;
  const SURROGATE_PAIR = /[\uD800-\uDBFF][\uDC00-\uDFFF]/g;
  const charCount = (text) => text.length - (text.match(SURROGATE_PAIR) || []).length;

  const state = {
    socket: null,
    socketOpen: false,
    reconnectAttempt: 0,
    reconnectTimer: null,
    stableTimer: null,
    pingTimer: null,
    conversations: new Map(), // id -> {id, title, model, updated_at}
    listCursor: null, // the oldest conversation the list API gave, while it has older ones (loadOlderConversations)
    currentId: null, // the conversation on screen; null for a new chat
    newChatRequest: null, // request_id of a new chat's first reply, until the server gives it an id
    streams: new Map(), // request_id -> {requestId, conversationId, messageId, text, userText, userView, view, ...}
    ended: new Set(), // request_ids of the latest replies that ended here (endStream): a late answer about one is moot
    loadToken: 0,
    refused: new Map(), // conversation id (null: a new chat) -> {text, message} of a send refused while away
    renaming: false, // a title being typed in the list: redraws wait for it (renderSidebar)
    sidebarStale: false, // a redraw is owed once the rename is done
    lastError: "", // the message of the server's latest error event: the reason of a close that follows it
    forbidden: false, // closed with CLOSE_FORBIDDEN: the page no longer reconnects
    // This tab, named in every chat.send: after its socket dropped without a close (the network vanished), a send from
    // its new socket, or from the page reloaded, takes over the conversation the old socket still streams into on the
    // server, instead of being refused as busy until the server gives that socket up (chat/consumers.py). Another tab
    // is another client. Set by claimClientId before the first socket opens.
    clientId: null,
  };

  /* Markdown ----------------------------------------------------------------------------------- */

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (text) => String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);

  window.marked.use({
    gfm: true,
    renderer: {
      html(token) {
        const text = escapeHtml(token.text);
        return token.block ? `<p>${text}</p>` : text;
      },
      image(token) {
        const label = escapeHtml(token.text || token.href);
        return `<a href="${escapeHtml(token.href)}">${label}</a>`;
      },
    },
  });

  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });

  function renderMarkdown(text) {
    return window.DOMPurify.sanitize(window.marked.parse(text, { async: false }), {
      USE_PROFILES: { html: true },
      FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "iframe", "video", "audio"],
      RETURN_DOM_FRAGMENT: true,
    });
  }

  const COPY_ICON =
    '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="9" y="9" width="11" height="11" rx="2"/><path d="M5 15V5a2 2 0 0 1 2-2h8"/></svg>';

  function svgButton(className, label, svg) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = className;
    button.setAttribute("aria-label", label);
    button.title = label;
    button.innerHTML = svg; // our own constant markup
    return button;
  }

  /* Wrap each code block with its language and a copy button; highlight once the text is final. */
  function decorateCode(container, highlight) {
    for (const code of container.querySelectorAll("pre > code")) {
      const pre = code.parentElement;
      const language = (code.className.match(/language-([\w+#.-]+)/) || [])[1] || "";
      const block = document.createElement("div");
      block.className = "code-block";
      const head = document.createElement("div");
      head.className = "code-head";
      const name = document.createElement("span");
      name.textContent = language || "code";
      const copy = svgButton("copy-btn", "Copy code", COPY_ICON);
      const copyLabel = document.createElement("span");
      copyLabel.className = "copy-label";
      copyLabel.textContent = "Copy";
      copy.append(copyLabel);
      copy.addEventListener("click", () => copyWithFeedback(copy, code.textContent));
      head.append(name, copy);
      pre.replaceWith(block);
      block.append(head, pre);
      if (highlight && window.hljs && language && window.hljs.getLanguage(language)) {
        window.hljs.highlightElement(code);
      }
    }
  }

  /* Messages ----------------------------------------------------------------------------------- */

  function createMessageView(message) {
    const root = document.createElement("article");
    root.className = `message ${message.role}`;
    if (message.id) root.dataset.messageId = message.id;
    root.setAttribute("aria-label", message.role === "user" ? "You said" : "Reply");
    if (message.role === "assistant") {
      const meta = document.createElement("div");
      meta.className = "message-meta";
      const model = document.createElement("span");
      model.className = "model-name";
      model.textContent = message.model || "";
      const provider = document.createElement("span");
      provider.className = "badge";
      provider.textContent = message.provider || "";
      meta.append(model, provider);
      root.append(meta);
    }
    const body = document.createElement("div");
    body.className = "message-body";
    root.append(body);
    el.emptyState.hidden = true;
    el.messages.append(root);
    return { root, body, role: message.role, text: "", messageId: message.id || null, feedback: message.feedback ?? null };
  }

  function paintUser(view, text) {
    view.text = text;
    view.body.textContent = text;
  }

  /* A reasoning model's reasoning, in a collapsible block above its reply: open while the model reasons,
     closed once the reply starts (the user may open it again). Plain text: it is not rendered as Markdown. */
  function paintReasoning(view, text, open) {
    if (!text) return;
    let block = view.root.querySelector("details.reasoning");
    if (!block) {
      block = document.createElement("details");
      block.className = "reasoning";
      const summary = document.createElement("summary");
      summary.textContent = "Reasoning";
      const body = document.createElement("div");
      body.className = "reasoning-body";
      block.append(summary, body);
      view.body.before(block);
      block.open = open;
    }
    block.querySelector(".reasoning-body").textContent = text;
  }

  function closeReasoning(view) {
    const block = view.root.querySelector("details.reasoning");
    if (block) block.open = false;
  }

  function paintAssistant(view, text, final) {
    view.text = text;
    if (!text && !final) {
      const typing = document.createElement("span");
      typing.className = "typing";
      typing.setAttribute("aria-label", "Writing");
      typing.append(document.createElement("span"), document.createElement("span"), document.createElement("span"));
      view.body.replaceChildren(typing);
      return;
    }
    view.body.replaceChildren(renderMarkdown(text));
    decorateCode(view.body, final);
  }

  /* The end state of a reply: a note for stopped or failed replies, and for one cut at its length limit (else
     it reads as whole), feedback buttons for the others. */
  const CUT_NOTE = "Cut short: the reply reached its length limit (the model's, or what your budget still pays for).";

  function settleView(view, { status, error, usage, finishReason }) {
    view.root.removeAttribute("aria-busy");
    view.root.dataset.status = status;
    for (const old of view.root.querySelectorAll(".message-status, .message-error, .message-footer")) old.remove();
    if (status === "streaming" || status === "cancelled" || (status === "complete" && finishReason === "length")) {
      const note = status === "cancelled" ? error || "Stopped." : status === "complete" ? CUT_NOTE : error;
      if (note) {
        const p = document.createElement("p");
        p.className = "message-status";
        p.textContent = note;
        view.root.append(p);
      }
    }
    if (status === "streaming") {
      view.root.setAttribute("aria-busy", "true");
      return;
    }
    if (status === "error") {
      const box = document.createElement("p");
      box.className = "message-error";
      box.setAttribute("role", "alert");
      box.textContent = error || "The reply failed.";
      view.root.append(box);
    }
    if (view.messageId && view.text) view.root.append(footerFor(view, usage));
  }

  const THUMB_UP =
    '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M7 10v11H4V10zM7 10l4-7a2 2 0 0 1 3 2l-1 5h6a2 2 0 0 1 2 2.3l-1.4 7A2 2 0 0 1 17.6 21H7"/></svg>';
  const THUMB_DOWN =
    '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M17 14V3h3v11zM17 14l-4 7a2 2 0 0 1-3-2l1-5H5a2 2 0 0 1-2-2.3l1.4-7A2 2 0 0 1 6.4 3H17"/></svg>';

  function footerFor(view, usage) {
    const footer = document.createElement("div");
    footer.className = "message-footer";
    const copy = svgButton("icon-btn", "Copy reply", COPY_ICON);
    copy.addEventListener("click", () => copyWithFeedback(copy, view.text));
    const up = svgButton("icon-btn", "Good reply", THUMB_UP);
    const down = svgButton("icon-btn", "Bad reply", THUMB_DOWN);
    const sync = () => {
      up.setAttribute("aria-pressed", String(view.feedback === 1));
      down.setAttribute("aria-pressed", String(view.feedback === -1));
    };
    const vote = async (value) => {
      const next = view.feedback === value ? null : value;
      try {
        const saved = await api(`/api/messages/${view.messageId}/feedback/`, { method: "POST", body: { value: next } });
        view.feedback = saved.feedback;
        sync();
      } catch (error) {
        toast(error.message);
      }
    };
    up.addEventListener("click", () => vote(1));
    down.addEventListener("click", () => vote(-1));
    sync();
    footer.append(copy, up, down);
    if (usage) {
      const info = document.createElement("span");
      info.className = "usage";
      const cost = String(usage.cost).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
      const figures = `${usage.prompt_tokens} + ${usage.completion_tokens} tokens · $${cost}`;
      info.textContent = usage.estimated ? `≈ ${figures}` : figures;
      info.title = usage.estimated
        ? "Prompt + reply tokens and cost. The provider reported no usage for this reply: the tokens were counted."
        : "Prompt + reply tokens and cost.";
      footer.append(info);
    }
    return footer;
  }

  function nearBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
  }

  function scrollToBottom() {
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function clearMessages() {
    for (const node of [...el.messages.children]) if (node !== el.emptyState) node.remove();
    el.emptyState.hidden = false;
  }

  function toast(message) {
    const node = document.createElement("div");
    node.className = "toast";
    node.setAttribute("role", "alert");
    node.textContent = message;
    document.body.append(node);
    setTimeout(() => node.remove(), 6000);
  }

  /* Streams ------------------------------------------------------------------------------------ */

  function streamOnScreen() {
    for (const stream of state.streams.values()) {
      if (state.currentId !== null ? stream.conversationId === state.currentId : stream.requestId === state.newChatRequest) {
        return stream;
      }
    }
    return null;
  }

  function schedulePaint(stream) {
    if (!stream.view || stream.frame) return;
    // One paint per frame however many tokens arrived: re-rendering Markdown per token would stall.
    stream.frame = requestAnimationFrame(() => {
      stream.frame = 0;
      if (!stream.view) return;
      const follow = nearBottom();
      paintReasoning(stream.view, stream.reasoning, !stream.text);
      if (stream.text && !stream.reasoningClosed) {
        stream.reasoningClosed = true;
        closeReasoning(stream.view);
      }
      paintAssistant(stream.view, stream.text, false);
      announceReply(stream, false);
      if (follow) scrollToBottom();
    });
  }

  /* Screen readers hear the reply on screen as it streams, a sentence at a time once each is complete, and
     the rest (with a stopped or cut reply's note) once, when it ends: in a polite live region of its own
     (#reply-announcer), each part added as a paragraph. The visible text is repainted every frame and is not
     live, or every token would be read; the transcript (role log) is not live either, or the finished reply
     would be read a second time. */
  const SENTENCE_END = /[.!?…]["')\]*_`]*\s|\n/g;

  function announceReply(stream, final) {
    if (!stream.view) return;
    let end = stream.announced;
    if (final) end = stream.text.length;
    else {
      SENTENCE_END.lastIndex = stream.announced;
      for (let match; (match = SENTENCE_END.exec(stream.text)); ) end = match.index + match[0].length;
    }
    if (end <= stream.announced) return;
    announce(spokenText(stream.text.slice(stream.announced, end)));
    stream.announced = end;
  }

  function announce(text) {
    if (!text) return;
    const part = document.createElement("p");
    part.textContent = text;
    el.announcer.append(part);
  }

  // What a part of the reply reads as: its Markdown rendered, the text without the marks.
  function spokenText(markdown) {
    const box = document.createElement("div");
    box.append(renderMarkdown(markdown));
    return box.textContent.replace(/\s+/g, " ").trim();
  }

  /* A reply ends on the page. Its id is kept a while (the latest ENDED_KEPT): Stop pressed as the reply ended sends a
     cancel the server answers, once done with the reply, with a not_found that only says it had ended already. */
  const ENDED_KEPT = 50;

  function endStream(stream) {
    state.streams.delete(stream.requestId);
    if (state.newChatRequest === stream.requestId) state.newChatRequest = null;
    state.ended.add(stream.requestId);
    if (state.ended.size > ENDED_KEPT) state.ended.delete(state.ended.values().next().value);
  }

  function finishStream(stream, status, { error, usage, finishReason } = {}) {
    // The last chunks may have queued a repaint for the next frame. It would run after the final paint
    // below and show the reply as unfinished again: without highlighting until a reload.
    cancelAnimationFrame(stream.frame);
    stream.frame = 0;
    endStream(stream);
    if (stream.view) {
      const follow = nearBottom();
      stream.view.messageId = stream.messageId;
      paintReasoning(stream.view, stream.reasoning, !stream.text);
      if (stream.text) closeReasoning(stream.view);
      paintAssistant(stream.view, stream.text, true);
      settleView(stream.view, { status, error, usage, finishReason });
      announceReply(stream, true);
      const note = stream.view.root.querySelector(".message-status");
      if (note) announce(note.textContent);
      if (follow) scrollToBottom();
    }
    if (stream.conversationId !== null) touchConversation(stream.conversationId);
    renderSidebar();
    updateComposer();
  }

  /* A send refused before its turn began (no chat.started: busy, a model not allowed, no budget...) saved
     nothing. Its message is taken back out of the transcript and its text put back in the box, to send
     again once the reason (shown under the box) is dealt with; a reload shows the same. Refused once the
     user has gone to another conversation, it waits for them there (giveBackRefused), and a toast says so. */
  function refuseSend(stream, message) {
    cancelAnimationFrame(stream.frame);
    endStream(stream);
    if (stream.view) {
      if (stream.userView) stream.userView.root.remove();
      stream.view.root.remove();
      if (!el.messages.querySelector(".message")) el.emptyState.hidden = false;
    }
    giveBack(stream, message);
    renderSidebar();
    updateComposer();
  }

  /* A send into a conversation deleted meanwhile (in another tab or window): it leaves the list, and when it is
     the one on screen the page moves to a new chat, where the message, back in the box, starts one. */
  const DELETED_NOTE =
    "This conversation was deleted, perhaps in another tab or window. Your message is back in the box: " +
    "sending it starts a new chat.";

  function conversationGone(stream) {
    const onScreen = stream.view !== null && state.currentId === stream.conversationId;
    state.conversations.delete(stream.conversationId);
    // Sent from a page left since, the message waits in the new chat's box: its own conversation is gone.
    if (!onScreen) stream.conversationId = null;
    refuseSend(stream, DELETED_NOTE);
    if (!onScreen) return;
    newChat({ push: true });
    showComposerError(DELETED_NOTE);
  }

  /* The text of a send that got no reply, to send again: in the box when its conversation is on screen,
     else kept for when the user goes back to it (giveBackRefused), which a toast says. */
  function giveBack(stream, message) {
    if (stream.view) {
      putBack(stream.userText, message);
      return;
    }
    const where = stream.conversationId === null ? null : state.conversations.get(stream.conversationId);
    state.refused.set(stream.conversationId, { text: stream.userText, message });
    toast(`In “${where ? where.title : "New chat"}”: ${message} Your message is back in its box there.`);
  }

  /* The refused text back in the box, and why under it; whatever was typed meanwhile is kept, after it. */
  function putBack(text, message) {
    const typed = el.prompt.value;
    if (typed !== text) el.prompt.value = typed.trim() ? `${text}\n\n${typed}` : text;
    autosize();
    showComposerError(message);
  }

  /* On opening a conversation (null: a new chat) whose send was refused while the user was elsewhere. */
  function giveBackRefused(id) {
    const refused = state.refused.get(id);
    if (!refused) return;
    state.refused.delete(id);
    putBack(refused.text, refused.message);
  }

  function showComposerError(message) {
    el.composerError.textContent = message;
    el.composerError.hidden = !message;
  }

  function newRequestId() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  /* The tab's client id. Kept in sessionStorage, so that a reload of the tab is the same client: its close may never
     have reached the server (a reload is what a user does when the network hangs), and its send takes over the reply
     its old socket still streams there. A duplicated tab (or one window.open made) starts with a copy of that storage,
     while the original is live and another client: at load a tab holding an id asks the others on a BroadcastChannel
     whether it is in use, any tab holding it answers, and a tab answered (the question's, or any later one's) makes
     an id of its own. No answer within CLIENT_ANSWER_MS: the id is this tab's, and its first socket opens. */
  const CLIENT_STORAGE_KEY = "llmhub.client";
  const CLIENT_CHANNEL = "llmhub.chat-client";
  const CLIENT_ANSWER_MS = 400;

  function claimClientId() {
    const mint = () => {
      state.clientId = newRequestId();
      try {
        sessionStorage.setItem(CLIENT_STORAGE_KEY, state.clientId);
      } catch (error) {
        // Storage refused (full, or blocked): the id holds for this load, as each load's id did.
      }
    };
    let stored = null;
    try {
      stored = sessionStorage.getItem(CLIENT_STORAGE_KEY);
    } catch (error) {
      stored = null;
    }
    if (!("BroadcastChannel" in window)) {
      // No way to tell a reload from a duplicate: a new id at each load, two tabs never one client.
      mint();
      return Promise.resolve();
    }
    const channel = new BroadcastChannel(CLIENT_CHANNEL);
    return new Promise((resolve) => {
      channel.addEventListener("message", ({ data }) => {
        if (!data || data.client !== state.clientId) return;
        if (data.type === "in-use?") {
          channel.postMessage({ type: "in-use", client: state.clientId });
        } else if (data.type === "in-use") {
          mint(); // another live tab holds it: this one is the copy
          resolve();
        }
      });
      if (!stored) {
        mint();
        resolve();
        return;
      }
      state.clientId = stored;
      channel.postMessage({ type: "in-use?", client: stored });
      setTimeout(resolve, CLIENT_ANSWER_MS);
    });
  }

  function sendMessage() {
    const text = el.prompt.value;
    if (!text.trim() || streamOnScreen()) return;
    if (state.forbidden) {
      showComposerError(state.lastError || "Your account may no longer chat.");
      return;
    }
    // Checked here, not left to the server: a message past the server's WebSocket limit (1.25 MiB) closes the socket
    // unanswered, and the page would only say that the connection dropped, to send it again (docs/deployment.md).
    const length = text.length > MAX_CONTENT_CHARS ? charCount(text) : text.length;
    if (length > MAX_CONTENT_CHARS) {
      showComposerError(
        `This message is ${length.toLocaleString("en-US")} characters long; a message may have at most ` +
          `${MAX_CONTENT_CHARS.toLocaleString("en-US")}. Shorten it, or send it in parts.`,
      );
      return;
    }
    if (!state.socketOpen) {
      toast("Not connected. Reconnecting, try again in a moment.");
      return;
    }
    const model = el.picker.value;
    const option = el.picker.selectedOptions[0];
    const provider = option ? option.dataset.provider : "";
    const requestId = newRequestId();
    showComposerError("");
    const userView = createMessageView({ role: "user" });
    paintUser(userView, text);
    const view = createMessageView({ role: "assistant", model, provider });
    paintAssistant(view, "", false);
    settleView(view, { status: "streaming" });
    state.streams.set(requestId, {
      requestId,
      conversationId: state.currentId,
      messageId: null,
      text: "",
      reasoning: "", // the model's reasoning so far (chat.reasoning), shown above the reply
      reasoningClosed: false, // its block was closed when the reply began
      userText: text,
      userView, // taken back out of the transcript if the server refuses the send (refuseSend)
      model,
      provider,
      view,
      frame: 0, // the pending repaint's requestAnimationFrame id
      announced: 0, // how much of text screen readers were given (announceReply)
    });
    el.announcer.replaceChildren();
    if (state.currentId === null) state.newChatRequest = requestId;
    // The effort control, shown only for a model whose catalog entry says it reasons; "Off" asks for none.
    const effort = el.effortControl.hidden ? null : el.effort.value || null;
    state.socket.send(
      JSON.stringify({
        type: "chat.send",
        conversation: state.currentId,
        model,
        content: text,
        request_id: requestId,
        reasoning_effort: effort,
        client: state.clientId,
      }),
    );
    el.prompt.value = "";
    autosize();
    scrollToBottom();
    renderSidebar();
    updateComposer();
  }

  function stopStreaming() {
    const stream = streamOnScreen();
    if (stream && state.socketOpen) state.socket.send(JSON.stringify({ type: "chat.cancel", request_id: stream.requestId }));
  }

  function handleEvent(event) {
    const stream = event.request_id ? state.streams.get(event.request_id) : null;
    switch (event.type) {
      case "chat.started":
        if (!stream) return;
        stream.conversationId = event.conversation;
        stream.messageId = event.message;
        if (stream.view) {
          stream.view.root.dataset.messageId = event.message;
          // Who answered: routing may have gone to another deployment, or a fallback model.
          const meta = stream.view.root.querySelector(".message-meta");
          if (meta && event.model) {
            meta.querySelector(".model-name").textContent = event.model;
            const badge = meta.querySelector(".badge");
            badge.textContent = event.provider || "";
            badge.title = event.deployment ? `deployment ${event.deployment}` : "";
          }
        }
        if (state.newChatRequest === stream.requestId && state.currentId === null) {
          state.currentId = event.conversation;
          state.newChatRequest = null;
          history.replaceState({ conversation: event.conversation }, "", `/c/${event.conversation}/`);
        }
        if (!state.conversations.has(event.conversation)) {
          state.conversations.set(event.conversation, { id: event.conversation, title: event.title, model: event.model });
        } else if (event.title) {
          state.conversations.get(event.conversation).title = event.title; // renamed elsewhere meanwhile
        }
        touchConversation(event.conversation);
        renderSidebar();
        break;
      case "chat.reasoning":
        if (!stream) return;
        stream.reasoning += event.content;
        schedulePaint(stream);
        break;
      case "chat.delta":
        if (!stream) return;
        stream.text += event.content;
        schedulePaint(stream);
        break;
      case "chat.completed":
        if (stream) finishStream(stream, "complete", { usage: event.usage, finishReason: event.finish_reason });
        break;
      case "chat.cancelled":
        if (stream) finishStream(stream, "cancelled", { usage: event.usage });
        break;
      case "error":
        if (!stream && event.code === "not_found" && state.ended.has(event.request_id)) break; // a late Stop's answer
        state.lastError = event.message;
        if (!stream) toast(event.message);
        else if (stream.messageId !== null) finishStream(stream, "error", { error: event.message });
        else if (event.code === "not_found" && stream.conversationId !== null) conversationGone(stream);
        else refuseSend(stream, event.message);
        break;
      default:
        break; // pong, auth.ok
    }
  }

  /* The socket, reconnected with exponential backoff ------------------------------------------ */

  function setConnection(stateName, text) {
    el.conn.dataset.state = stateName;
    el.conn.querySelector(".conn-text").textContent = text;
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/ws/chat/`);
    state.socket = socket;
    setConnection("connecting", "Connecting…");
    socket.addEventListener("open", () => {
      state.socketOpen = true;
      // The backoff starts over only once the socket has held: a server that accepts and drops at
      // once (a restart loop, a proxy timing out) keeps getting longer delays instead of 0.5 s.
      clearTimeout(state.stableTimer);
      state.stableTimer = setTimeout(() => {
        state.reconnectAttempt = 0;
      }, STABLE_AFTER_MS);
      setConnection("open", "Connected");
      state.pingTimer = setInterval(() => socket.send(JSON.stringify({ type: "ping" })), PING_INTERVAL_MS);
      updateComposer();
    });
    socket.addEventListener("message", (message) => handleEvent(JSON.parse(message.data)));
    socket.addEventListener("close", (closed) => {
      if (state.socket !== socket) return;
      state.socketOpen = false;
      clearInterval(state.pingTimer);
      clearTimeout(state.stableTimer);
      // The server keeps what was written of an interrupted reply; show it as stopped. A reply that had not
      // begun has nothing to show: its message goes back in the box too, to send again once reconnected
      // (the server may have kept the message, under an empty stopped reply, as a reload shows).
      for (const stream of [...state.streams.values()]) {
        if (stream.messageId) {
          finishStream(stream, "cancelled", { error: "The connection dropped; the reply was stopped." });
        } else {
          finishStream(stream, "error", { error: "The connection dropped before the reply began." });
          giveBack(stream, "The connection dropped before the reply began: send your message again once reconnected.");
        }
      }
      if (closed.code === CLOSE_UNAUTHENTICATED) {
        setConnection("closed", "Signed out");
        // The send the server refused for it is back in the box: the sign-in form must not throw it away.
        if (el.prompt.value.trim()) {
          sessionStorage.setItem(DRAFT_STORAGE_KEY, JSON.stringify({ path: location.pathname, text: el.prompt.value }));
        }
        window.location.assign("/accounts/login/?next=" + encodeURIComponent(location.pathname));
        return;
      }
      if (closed.code === CLOSE_FORBIDDEN) {
        // Every new socket would be refused the same way: say why, under the box, instead of trying again.
        state.forbidden = true;
        setConnection("closed", "Chat not allowed");
        showComposerError(state.lastError || "Your account may no longer chat.");
        updateComposer();
        return;
      }
      const delay = Math.min(RECONNECT_MAX_MS, 500 * 2 ** state.reconnectAttempt) * (0.8 + Math.random() * 0.4);
      state.reconnectAttempt += 1;
      setConnection("closed", `Reconnecting in ${Math.ceil(delay / 1000)} s…`);
      state.reconnectTimer = setTimeout(connect, delay);
      updateComposer();
    });
  }

  function reconnectNow() {
    if (state.socketOpen || state.forbidden) return;
    if (state.socket && state.socket.readyState === WebSocket.CLOSED) connect();
  }
  window.addEventListener("online", reconnectNow);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState !== "visible") return;
    reconnectNow();
    refreshFromServer();
    refreshOpenConversation();
  });

  /* Conversations ------------------------------------------------------------------------------ */

  function touchConversation(id) {
    const conversation = state.conversations.get(id);
    if (conversation) conversation.updated_at = new Date().toISOString();
  }

  /* The list comes a page at a time, newest first; "Older conversations" asks for the page after the oldest one
     listed (keyset: by its updated_at and id, as the server gave them, none skipped or repeated however the
     conversations on the page have moved since). */
  const LIST_PAGE = 100;

  async function loadConversations() {
    try {
      const data = await api(`/api/conversations/?limit=${LIST_PAGE}`);
      state.conversations = new Map(data.results.map((c) => [c.id, c]));
      noteListCursor(data);
    } catch (error) {
      toast(`Could not load conversations: ${error.message}`);
    }
    renderSidebar();
  }

  async function loadOlderConversations() {
    const cursor = state.listCursor;
    if (!cursor) return;
    el.convMore.disabled = true;
    try {
      const query = new URLSearchParams({ limit: LIST_PAGE, before_updated_at: cursor.updated_at, before_id: cursor.id });
      const data = await api(`/api/conversations/?${query}`);
      for (const conversation of data.results) {
        if (!state.conversations.has(conversation.id)) state.conversations.set(conversation.id, conversation);
      }
      noteListCursor(data);
    } catch (error) {
      toast(`Could not load older conversations: ${error.message}`);
    } finally {
      el.convMore.disabled = false;
    }
    renderSidebar();
  }

  /* What changed elsewhere since the page was loaded, a title renamed in another tab or window, a model an
     administrator took out of the plan, the page learned only at a reload (a send with that model was refused).
     Coming back to the page reads the list's first page and the model catalog again: titles follow, and a
     model no longer included is greyed out (and one included again offered), the menu moving off it. */
  async function refreshFromServer() {
    try {
      const [list, catalog] = await Promise.all([api(`/api/conversations/?limit=${LIST_PAGE}`), api("/api/models/")]);
      for (const fresh of list.results) {
        const known = state.conversations.get(fresh.id);
        if (!known) state.conversations.set(fresh.id, fresh);
        else known.title = fresh.title;
      }
      refreshModels(catalog);
    } catch (error) {
      return; // offline, or the server restarting: the next return to the page tries again
    }
    renderSidebar();
  }

  /* The conversation on screen, as another tab or window may have added to it (a turn taken there): drawn again when
     the server's newest message is not on screen, so that the transcript is the history the next message is sent
     with. Not while a reply of this tab streams into it (the server refuses another turn meanwhile). */
  async function refreshOpenConversation() {
    const id = state.currentId;
    if (id === null || streamOnScreen()) return;
    const token = state.loadToken;
    let data;
    try {
      data = await api(`/api/conversations/${id}/`);
    } catch (error) {
      return; // deleted (a send says so), offline, or the server restarting: the next return tries again
    }
    if (token !== state.loadToken || state.currentId !== id || streamOnScreen()) return;
    const newest = data.messages[data.messages.length - 1];
    if (!newest || el.messages.querySelector(`.message[data-message-id="${newest.id}"]`)) return;
    openConversation(id, { push: false });
  }

  function refreshModels(catalog) {
    const planLocked = new Map(
      catalog.filter((m) => m.locked_reason !== "own_key").map((m) => [m.id, Boolean(m.locked)]),
    );
    for (const model of MODELS) {
      if (model.locked_reason === "own_key" || !planLocked.has(model.name)) continue;
      const locked = planLocked.get(model.name);
      if (locked === model.locked) continue;
      model.locked = locked;
      model.locked_reason = locked ? "plan" : "";
      const option = [...el.picker.options].find((o) => o.value === model.name);
      if (!option) continue;
      option.disabled = locked;
      if (locked) option.dataset.locked = "true";
      else delete option.dataset.locked;
      option.title = locked ? `Not in your plan: upgrade to use ${model.label}` : "";
      option.textContent = locked ? `${model.label} · not in your plan` : model.label;
      if (!locked && model.reasoning) option.dataset.reasoning = "true";
    }
    const selected = el.picker.selectedOptions[0];
    if (selected && selected.disabled) {
      const usable = [...el.picker.options].find((o) => !o.disabled);
      if (usable) el.picker.value = usable.value;
    }
    el.picker.disabled = !MODELS.some((model) => !model.locked);
    updateBadge();
    updateComposer();
  }

  function noteListCursor(data) {
    const oldest = data.results[data.results.length - 1];
    state.listCursor = data.next && oldest ? { updated_at: oldest.updated_at, id: oldest.id } : null;
    el.convMore.hidden = !state.listCursor;
  }

  const EDIT_ICON = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 20h4L19 9l-4-4L4 16zM13.5 6.5l4 4"/></svg>';
  const TRASH_ICON =
    '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 7h16M10 11v6M14 11v6M6 7l1 13h10l1-13M9 7V4h6v3"/></svg>';

  function renderSidebar() {
    // Redrawing would throw away a title being typed (a reply ending elsewhere redraws the list): the
    // redraw waits until the rename is saved or given up, and is done then.
    if (state.renaming) {
      state.sidebarStale = true;
      return;
    }
    state.sidebarStale = false;
    const keep = focusInList();
    const busy = new Set([...state.streams.values()].map((s) => s.conversationId));
    const items = [...state.conversations.values()].sort((a, b) =>
      String(b.updated_at || "").localeCompare(String(a.updated_at || "")),
    );
    el.convList.replaceChildren(
      ...items.map((conversation) => {
        const item = document.createElement("li");
        item.className = "conv-item";
        item.dataset.conversationId = conversation.id;
        if (conversation.id === state.currentId) item.setAttribute("aria-current", "true");
        if (busy.has(conversation.id)) item.classList.add("conv-streaming");
        const link = document.createElement("a");
        link.className = "conv-link";
        link.href = `/c/${conversation.id}/`;
        link.dataset.part = "link";
        link.textContent = conversation.title || "New conversation";
        link.title = conversation.updated_at ? formatDate(conversation.updated_at) : "";
        link.addEventListener("click", (event) => {
          if (event.metaKey || event.ctrlKey || event.shiftKey || event.button !== 0) return;
          event.preventDefault();
          openConversation(conversation.id, { push: true });
        });
        const actions = document.createElement("div");
        actions.className = "conv-actions";
        const rename = svgButton("icon-btn", `Rename “${conversation.title}”`, EDIT_ICON);
        rename.addEventListener("click", () => startRename(item, link, conversation));
        rename.dataset.part = "rename";
        const remove = svgButton("icon-btn", `Delete “${conversation.title}”`, TRASH_ICON);
        remove.dataset.part = "delete";
        remove.addEventListener("click", () => deleteConversation(conversation));
        actions.append(rename, remove);
        item.append(link, actions);
        return item;
      }),
    );
    el.convEmpty.hidden = items.length > 0;
    if (keep) keep();
  }

  /* The list is redrawn whole (a conversation opened, renamed, deleted, or given a reply): the control a
     keyboard user had focused in it would go with it, and their next Tab start over from the top. This
     notes which one it was, and returns what puts the focus on the same control of the new list (on the
     next conversation's link when its own is gone, else on "New chat"). */
  function focusInList() {
    const focused = document.activeElement;
    if (!focused || !focused.dataset.part || !el.convList.contains(focused)) return null;
    const items = [...el.convList.children];
    const index = items.indexOf(focused.closest(".conv-item"));
    const id = items[index].dataset.conversationId;
    const part = focused.dataset.part;
    return () => {
      const same = el.convList.querySelector(`.conv-item[data-conversation-id="${id}"] [data-part="${part}"]`);
      const after = el.convList.children[Math.min(index, el.convList.children.length - 1)];
      const target = same || (after && after.querySelector('[data-part="link"]')) || el.newChat;
      if (target !== document.activeElement) target.focus();
    };
  }

  function startRename(item, link, conversation) {
    const input = document.createElement("input");
    input.type = "text";
    input.className = "conv-rename";
    input.value = conversation.title;
    input.maxLength = 200;
    input.setAttribute("aria-label", "New title");
    input.dataset.part = "rename"; // once done, the focus goes back to the Rename button (focusInList)
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const title = input.value.trim();
      if (save && title && title !== conversation.title) {
        try {
          const saved = await api(`/api/conversations/${conversation.id}/`, { method: "PATCH", body: { title } });
          conversation.title = saved.title;
        } catch (error) {
          toast(error.message);
        }
      }
      state.renaming = false;
      renderSidebar();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        finish(true);
      } else if (event.key === "Escape") {
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
    link.replaceWith(input);
    state.renaming = true;
    item.querySelector(".conv-actions").hidden = true;
    input.focus();
    input.select();
  }

  async function deleteConversation(conversation) {
    if (!window.confirm(`Delete “${conversation.title}”? This cannot be undone.`)) return;
    try {
      await api(`/api/conversations/${conversation.id}/`, { method: "DELETE" });
    } catch (error) {
      if (error.status !== 404) {
        toast(error.message);
        return;
      }
    }
    // A reply still streaming into it would otherwise be generated, and billed, to its end for no one.
    for (const stream of state.streams.values()) {
      if (stream.conversationId === conversation.id && state.socketOpen) {
        state.socket.send(JSON.stringify({ type: "chat.cancel", request_id: stream.requestId }));
      }
    }
    state.conversations.delete(conversation.id);
    if (state.currentId === conversation.id) newChat({ push: true });
    renderSidebar();
  }

  function detachStreams() {
    showComposerError("");
    for (const stream of state.streams.values()) {
      stream.view = null;
      stream.userView = null;
    }
  }

  function selectModel(name) {
    // A model the plan does not include is shown (disabled) but never selected, even for an old conversation.
    if (!name || ![...el.picker.options].some((o) => o.value === name && !o.disabled)) return;
    el.picker.value = name;
    updateBadge();
  }

  async function openConversation(id, { push }) {
    const token = ++state.loadToken;
    state.currentId = id;
    state.newChatRequest = null;
    detachStreams();
    clearMessages();
    giveBackRefused(id);
    el.emptyState.hidden = true;
    if (push) history.pushState({ conversation: id }, "", `/c/${id}/`);
    closeSidebar();
    renderSidebar();
    updateComposer();
    let data;
    try {
      data = await api(`/api/conversations/${id}/`);
    } catch (error) {
      if (token !== state.loadToken) return;
      const view = createMessageView({ role: "assistant" });
      paintAssistant(view, "", true);
      settleView(view, {
        status: "error",
        error: error.status === 404 ? "This conversation does not exist." : error.message,
      });
      state.conversations.delete(id);
      renderSidebar();
      return;
    }
    if (token !== state.loadToken) return;
    document.title = `${data.title || "Chat"} · llmhub`;
    selectModel(data.model);
    // A reply of this socket still waiting for its first token has no message id yet (chat.started brings
    // it): when the conversation's newest message is a streaming reply, that is the one; when the turn is
    // not written yet, it is shown after the history, as it was when sent.
    const pending = [...state.streams.values()].find((s) => s.conversationId === id && s.messageId === null);
    const newest = data.messages[data.messages.length - 1];
    const pendingRow = pending && newest && newest.role === "assistant" && newest.status === "streaming" ? newest : null;
    const elsewhere = new Map(); // message id -> view, of replies another tab or window is receiving
    for (const message of data.messages) {
      const view = createMessageView(message);
      if (message.role === "user") {
        paintUser(view, message.content);
        continue;
      }
      const live =
        message === pendingRow ? pending : [...state.streams.values()].find((s) => s.messageId === message.id);
      if (live) {
        live.view = view;
        live.announced = live.text.length; // back to it: what streamed meanwhile is on screen, not read out
        paintReasoning(view, live.reasoning, !live.text);
        paintAssistant(view, live.text, false);
        settleView(view, { status: "streaming" });
      } else if (message.status === "streaming") {
        // Not this tab's: another tab or window is receiving it, and the server refuses a second reply in
        // the conversation meanwhile. One a stopped server left is closed by the server, with its reason.
        paintReasoning(view, message.reasoning, !message.content);
        paintAssistant(view, message.content, false);
        settleView(view, { status: "streaming", error: ELSEWHERE_NOTE });
        elsewhere.set(message.id, view);
      } else {
        paintFinished(view, message);
      }
    }
    if (elsewhere.size) followElsewhere(id, token, elsewhere);
    if (pending && !pendingRow) {
      pending.userView = createMessageView({ role: "user" });
      paintUser(pending.userView, pending.userText);
      pending.view = createMessageView({ role: "assistant", model: pending.model, provider: pending.provider });
      pending.announced = pending.text.length;
      paintReasoning(pending.view, pending.reasoning, !pending.text);
      paintAssistant(pending.view, pending.text, false);
      settleView(pending.view, { status: "streaming" });
    }
    scrollToBottom();
  }

  function paintFinished(view, message) {
    paintReasoning(view, message.reasoning, false);
    paintAssistant(view, message.content, true);
    settleView(view, {
      status: message.status,
      error: message.error_message,
      usage: message.usage, // from the reply's ledger row; null until that is written
      finishReason: message.finish_reason,
    });
  }

  /* Replies another tab or window is receiving reach this one through no socket: while one is on screen,
     the conversation is read again every few seconds (only while the page is visible), its text brought up
     to date from the server's checkpoints, and the reply settled once it has ended. Opening another
     conversation (a new loadToken) ends the polling. */
  const ELSEWHERE_NOTE = "Still being written in another tab or window.";
  const ELSEWHERE_POLL_MS = 2500;

  function followElsewhere(id, token, views) {
    setTimeout(async () => {
      if (token !== state.loadToken) return;
      if (document.hidden) {
        followElsewhere(id, token, views);
        return;
      }
      let data = null;
      try {
        data = await api(`/api/conversations/${id}/`);
      } catch (error) {
        if (error.status === 404) return; // deleted meanwhile
        // Otherwise offline, or the server restarting: try again at the next tick.
      }
      if (token !== state.loadToken) return;
      for (const message of data ? data.messages : []) {
        const view = views.get(message.id);
        if (!view) continue;
        if (message.status === "streaming") {
          paintReasoning(view, message.reasoning, !message.content);
          if (message.content !== view.text) paintAssistant(view, message.content, false);
          continue;
        }
        paintFinished(view, message);
        views.delete(message.id);
      }
      if (views.size) followElsewhere(id, token, views);
    }, ELSEWHERE_POLL_MS);
  }

  function newChat({ push }) {
    state.loadToken += 1;
    state.currentId = null;
    state.newChatRequest = null;
    detachStreams();
    clearMessages();
    giveBackRefused(null);
    document.title = "Chat · llmhub";
    if (push) history.pushState({ conversation: null }, "", "/");
    closeSidebar();
    renderSidebar();
    updateComposer();
    el.prompt.focus();
  }

  window.addEventListener("popstate", () => {
    const match = location.pathname.match(/^\/c\/(\d+)\/$/);
    if (match) openConversation(Number(match[1]), { push: false });
    else newChat({ push: false });
  });

  /* Composer, picker, sidebar ------------------------------------------------------------------ */

  function updateComposer() {
    const active = streamOnScreen();
    // Send and Stop take turns in one place: the focus on the one hiding passes to the other, not to the page.
    const handOver = document.activeElement === (active ? el.send : el.stop);
    el.send.hidden = Boolean(active);
    el.stop.hidden = !active;
    if (handOver) (active ? el.stop : el.send).focus();
    el.send.disabled = !state.socketOpen || !MODELS.some((model) => !model.locked);
  }

  function autosize() {
    el.prompt.style.height = "auto";
    el.prompt.style.height = `${el.prompt.scrollHeight}px`;
  }

  function updateBadge() {
    const option = el.picker.selectedOptions[0];
    el.badge.textContent = option ? option.dataset.provider || "" : "";
    // The whole name, where the toolbar's room cuts it (a phone's: app.css).
    el.badge.title = el.badge.textContent ? `Provider: ${el.badge.textContent}` : "Provider";
    el.effortControl.hidden = !(option && option.dataset.reasoning === "true");
  }

  function openSidebar() {
    el.sidebar.classList.add("open");
    el.scrim.hidden = false;
    el.sidebarToggle.setAttribute("aria-expanded", "true");
    el.sidebarToggle.setAttribute("aria-label", "Hide conversations");
  }

  function closeSidebar() {
    // Focus in the sidebar (Escape, a conversation just opened from it) would be lost as it hides: back to
    // the button that opened it, as the menu does. Only from the phone's sliding sidebar, never on a desktop.
    const hadFocus = el.sidebar.classList.contains("open") && el.sidebar.contains(document.activeElement);
    el.sidebar.classList.remove("open");
    el.scrim.hidden = true;
    el.sidebarToggle.setAttribute("aria-expanded", "false");
    el.sidebarToggle.setAttribute("aria-label", "Show conversations");
    if (hadFocus) el.sidebarToggle.focus();
  }

  // A touch screen's keyboard has no Shift+Enter: there, Enter adds a line and the send button sends (the
  // hints say which, by the same media query in app.css).
  const ENTER_ADDS_LINE = window.matchMedia("(hover: none) and (pointer: coarse)");
  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    sendMessage();
  });
  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !ENTER_ADDS_LINE.matches) {
      event.preventDefault();
      sendMessage();
    } else if (event.key === "Escape" && streamOnScreen()) {
      stopStreaming();
    }
  });
  el.prompt.addEventListener("input", autosize);
  el.stop.addEventListener("click", stopStreaming);
  el.newChat.addEventListener("click", () => newChat({ push: true }));
  el.convMore.addEventListener("click", loadOlderConversations);
  el.picker.addEventListener("change", () => {
    updateBadge();
    localStorage.setItem(MODEL_STORAGE_KEY, el.picker.value);
  });
  el.sidebarToggle.addEventListener("click", () => {
    if (el.sidebar.classList.contains("open")) closeSidebar();
    else openSidebar();
  });
  el.scrim.addEventListener("click", closeSidebar);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && el.sidebar.classList.contains("open")) closeSidebar();
  });

  /* Back from the sign-in form on the page where the session ended: what was in the box is there again. */
  function restoreDraft() {
    const saved = sessionStorage.getItem(DRAFT_STORAGE_KEY);
    if (!saved) return;
    sessionStorage.removeItem(DRAFT_STORAGE_KEY);
    let draft = null;
    try {
      draft = JSON.parse(saved);
    } catch (error) {
      return;
    }
    if (!draft || draft.path !== location.pathname || typeof draft.text !== "string") return;
    putBack(draft.text, "Your session had ended before this message was sent: send it again.");
  }

  selectModel(localStorage.getItem(MODEL_STORAGE_KEY));
  updateBadge();
  updateComposer();
  if (INITIAL_CONVERSATION) openConversation(INITIAL_CONVERSATION, { push: false });
  restoreDraft(); // after the conversation's opening, which empties the note under the box
  loadConversations();
  claimClientId().then(connect);
})();
