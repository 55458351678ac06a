/* pollama's chat page (GET /ui): a client of the public Ollama API and nothing else.
 *
 *   GET  /api/tags   the models of the <select>
 *   POST /api/show   a model's capabilities ("vision": the image button; "thinking": think)
 *   POST /api/chat   the chat, streamed: one JSON object a line (NDJSON)
 *
 * Conversations live in this browser's localStorage. A request answered 401 shows the key
 * form; the key goes out as "Authorization: Bearer <key>". Everything the model writes is
 * Markdown rendered by marked, raw HTML in it shown as text, and the result passed through
 * DOMPurify before it reaches the page. No inline code: the Content-Security-Policy allows
 * scripts and styles from this origin's files only.
 */
(() => {
  "use strict";

  const STORE = "pollama.conversations";
  const CURRENT = "pollama.current";
  const MODEL = "pollama.model";
  const KEY = "pollama.key";

  const $ = (id) => document.getElementById(id);
  const el = {
    model: $("model"), status: $("status"), messages: $("messages"), empty: $("empty"),
    conversations: $("conversations"), newChat: $("new-chat"), forgetKey: $("forget-key"),
    keyForm: $("key-form"), keyMessage: $("key-message"), keyInput: $("key-input"),
    keyRemember: $("key-remember"), error: $("error"), errorText: $("error-text"),
    errorClose: $("error-close"), composer: $("composer"), prompt: $("prompt"),
    send: $("send"), stop: $("stop"), attach: $("attach"), imageInput: $("image-input"),
    attachments: $("attachments"),
  };

  const state = {
    conversations: loadConversations(),
    currentId: localStorage.getItem(CURRENT),
    capabilities: new Map(), // model name -> its capabilities, from /api/show
    controller: null,        // the AbortController of the chat being streamed
    images: [],              // base64 images attached to the next message
    afterKey: null,          // what to retry once a key is entered
  };

  /** Thrown when the server answers 401: the key form is up, the caller just stops. */
  class KeyNeeded extends Error {}

  // -- storage -------------------------------------------------------------------------------

  function loadConversations() {
    try {
      const list = JSON.parse(localStorage.getItem(STORE) || "[]");
      if (!Array.isArray(list)) return [];
      for (const m of list.flatMap((c) => c.messages || [])) {
        if (m.streaming) Object.assign(m, { streaming: false, stopped: true }); // page left mid-reply
      }
      return list;
    } catch {
      return [];
    }
  }

  function save() {
    try {
      localStorage.setItem(STORE, JSON.stringify(state.conversations));
    } catch {
      // Over the browser's quota (images are large): keep the text, drop stored images.
      const slim = state.conversations.map((c) => ({
        ...c, messages: c.messages.map(({ images, ...m }) => m),
      }));
      try {
        localStorage.setItem(STORE, JSON.stringify(slim));
        showError("This browser's storage is full: images are not kept across reloads.");
      } catch {
        showError("This browser's storage is full: this conversation is not kept.");
      }
    }
    if (state.currentId) localStorage.setItem(CURRENT, state.currentId);
    else localStorage.removeItem(CURRENT);
  }

  function storedKey() {
    return sessionStorage.getItem(KEY) || localStorage.getItem(KEY) || "";
  }

  // -- the API -------------------------------------------------------------------------------

  /** Why a request failed, as the server said it: {"error": "..."} or OpenAI's shape. */
  async function errorOf(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      const error = body.error;
      if (typeof error === "string") return error;
      if (error && typeof error.message === "string") return error.message;
    } catch {
      // not JSON: the text itself, below
    }
    return text.trim() || `${response.status} ${response.statusText}`;
  }

  /** fetch() with the key; 401 raises the key form, other failures throw the server's words. */
  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = storedKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    if (options.body) headers.set("Content-Type", "application/json");
    const response = await fetch(path, { ...options, headers });
    if (response.status === 401) {
      showKeyForm(await errorOf(response));
      throw new KeyNeeded("an API key is needed");
    }
    if (!response.ok) throw new Error(await errorOf(response));
    return response;
  }

  /** The objects of an NDJSON body, one a line, as they arrive. */
  async function* ndjson(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 1);
        if (line) yield JSON.parse(line);
      }
    }
    if (buffer.trim()) yield JSON.parse(buffer);
  }

  // -- the key form and errors ---------------------------------------------------------------

  function showKeyForm(message) {
    el.keyMessage.textContent = message || "This server requires an API key.";
    el.keyForm.hidden = false;
    el.keyInput.focus();
  }

  el.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const key = el.keyInput.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY, key);
    if (el.keyRemember.checked) localStorage.setItem(KEY, key);
    else localStorage.removeItem(KEY);
    el.keyInput.value = "";
    el.keyForm.hidden = true;
    el.forgetKey.hidden = false;
    hideError();
    const retry = state.afterKey || loadModels;
    state.afterKey = null;
    retry();
  });

  el.forgetKey.addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    localStorage.removeItem(KEY);
    el.forgetKey.hidden = true;
  });

  function showError(message) {
    el.errorText.textContent = message;
    el.error.hidden = false;
  }

  function hideError() {
    el.error.hidden = true;
  }

  el.errorClose.addEventListener("click", hideError);

  // -- models --------------------------------------------------------------------------------

  async function loadModels() {
    el.status.textContent = "Loading models…";
    let models;
    try {
      models = (await (await api("/api/tags")).json()).models || [];
    } catch (err) {
      el.status.textContent = "";
      if (!(err instanceof KeyNeeded)) showError(`Could not list models: ${err.message}`);
      return;
    }
    const wanted = currentConversation()?.model || localStorage.getItem(MODEL);
    el.model.replaceChildren();
    for (const m of models) el.model.append(new Option(m.name, m.name));
    if (!models.length) {
      el.model.append(new Option("No models: pull one with 'pollama pull <name>'", ""));
    } else if (models.some((m) => m.name === wanted)) {
      el.model.value = wanted;
    }
    el.status.textContent = "";
    await modelChanged();
  }

  async function capabilities(model) {
    if (!state.capabilities.has(model)) {
      const body = JSON.stringify({ model });
      const show = await (await api("/api/show", { method: "POST", body })).json();
      state.capabilities.set(model, show.capabilities || []);
    }
    return state.capabilities.get(model);
  }

  async function modelChanged() {
    const model = el.model.value;
    if (model) localStorage.setItem(MODEL, model);
    let caps = [];
    try {
      if (model) caps = await capabilities(model);
    } catch (err) {
      if (!(err instanceof KeyNeeded)) showError(`Could not read ${model}: ${err.message}`);
    }
    el.attach.hidden = !caps.includes("vision");
    if (el.attach.hidden) clearImages();
  }

  el.model.addEventListener("change", modelChanged);

  // -- rendering -----------------------------------------------------------------------------

  const markdown = new marked.Marked({
    gfm: true,
    renderer: {
      html: ({ text }) => escapeHtml(text),                       // the model's HTML, as text
      image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
    },
  });

  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  const PURIFY = {
    RETURN_DOM_FRAGMENT: true,
    FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea", "select"],
    FORBID_ATTR: ["style", "class", "id"],
  };

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
  }

  function renderMarkdown(target, text) {
    target.replaceChildren(DOMPurify.sanitize(markdown.parse(text), PURIFY));
  }

  function imageUrl(base64) {
    const kinds = { "/9j/": "jpeg", iVBOR: "png", R0lGO: "gif", UklGR: "webp" };
    const kind = Object.entries(kinds).find(([head]) => base64.startsWith(head));
    return `data:image/${kind ? kind[1] : "png"};base64,${base64}`;
  }

  function imageRow(images) {
    const row = document.createElement("div");
    row.className = "images";
    for (const b64 of images) {
      const img = new Image();
      img.src = imageUrl(b64);
      img.alt = "attached image";
      row.append(img);
    }
    return row;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** A message's bubble; an assistant's is updated in place by updateBubble. */
  function bubble(message) {
    const node = element("article", `message ${message.role}`);
    if (message.role === "user") {
      node.append(element("div", "text", message.content));
      if (message.images?.length) node.append(imageRow(message.images));
      return node;
    }
    const thinking = element("details", "thinking");
    thinking.append(element("summary", "", "Thinking"), element("div", "thinking-text"));
    node.append(element("div", "meta", message.model || ""), thinking,
      element("div", "content"), element("div", "note"));
    updateBubble(node, message);
    return node;
  }

  function updateBubble(node, message) {
    const thinking = node.querySelector(".thinking");
    thinking.hidden = !message.thinking;
    thinking.querySelector(".thinking-text").textContent = message.thinking || "";
    renderMarkdown(node.querySelector(".content"), message.content || "");
    const note = node.querySelector(".note");
    note.classList.toggle("failed", Boolean(message.error));
    note.textContent = message.error || (message.stopped ? "Stopped." : message.stats || "");
    node.dataset.state = message.streaming ? "streaming" : "done";
  }

  function renderMessages() {
    const conversation = currentConversation();
    const messages = conversation ? conversation.messages : [];
    el.messages.replaceChildren(el.empty);
    el.empty.hidden = messages.length > 0;
    for (const message of messages) el.messages.append(bubble(message));
    el.messages.scrollTop = el.messages.scrollHeight;
  }

  function renderConversations() {
    el.conversations.replaceChildren();
    for (const c of [...state.conversations].sort((a, b) => b.updated - a.updated)) {
      const item = element("li", c.id === state.currentId ? "active" : "");
      const open = element("button", "open", c.title || "New chat");
      open.type = "button";
      open.title = c.title || "";
      open.addEventListener("click", () => selectConversation(c.id));
      const remove = element("button", "link delete", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", `Delete ${c.title || "conversation"}`);
      remove.addEventListener("click", () => deleteConversation(c.id));
      item.append(open, remove);
      el.conversations.append(item);
    }
  }

  // -- conversations -------------------------------------------------------------------------

  function currentConversation() {
    return state.conversations.find((c) => c.id === state.currentId) || null;
  }

  function selectConversation(id) {
    if (state.controller) return; // not while a reply is streaming
    state.currentId = id;
    const conversation = currentConversation();
    if (conversation?.model && [...el.model.options].some((o) => o.value === conversation.model)) {
      el.model.value = conversation.model;
      modelChanged();
    }
    save();
    renderConversations();
    renderMessages();
  }

  function deleteConversation(id) {
    if (state.controller && id === state.currentId) return;
    state.conversations = state.conversations.filter((c) => c.id !== id);
    if (state.currentId === id) state.currentId = null;
    save();
    renderConversations();
    renderMessages();
  }

  el.newChat.addEventListener("click", () => {
    if (state.controller) return;
    state.currentId = null;
    save();
    renderConversations();
    renderMessages();
    el.prompt.focus();
  });

  function newConversation(model) {
    const id = crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
    const conversation = { id, title: "", model, messages: [], updated: Date.now() };
    state.conversations.push(conversation);
    state.currentId = id;
    return conversation;
  }

  // -- images --------------------------------------------------------------------------------

  el.attach.addEventListener("click", () => el.imageInput.click());

  el.imageInput.addEventListener("change", async () => {
    for (const file of el.imageInput.files) {
      const url = await new Promise((resolve, reject) => {
        const reader = new FileReader();
        reader.onload = () => resolve(reader.result);
        reader.onerror = () => reject(reader.error);
        reader.readAsDataURL(file);
      });
      state.images.push(String(url).slice(String(url).indexOf(",") + 1));
    }
    el.imageInput.value = "";
    renderAttachments();
  });

  function renderAttachments() {
    el.attachments.replaceChildren();
    state.images.forEach((b64, index) => {
      const figure = element("figure");
      const img = new Image();
      img.src = imageUrl(b64);
      img.alt = "image to send";
      const remove = element("button", "", "×");
      remove.type = "button";
      remove.setAttribute("aria-label", "Remove image");
      remove.addEventListener("click", () => {
        state.images.splice(index, 1);
        renderAttachments();
      });
      figure.append(img, remove);
      el.attachments.append(figure);
    });
  }

  function clearImages() {
    state.images = [];
    renderAttachments();
  }

  // -- the chat ------------------------------------------------------------------------------

  /** What /api/chat is sent of a stored message; failed, empty replies are left out. */
  function wire(message) {
    const out = { role: message.role, content: message.content || "" };
    if (message.images?.length) out.images = message.images;
    return out;
  }

  function setStreaming(on) {
    el.send.hidden = on;
    el.stop.hidden = !on;
    el.model.disabled = on;
  }

  /** Read the reply's lines into `reply`, repainting its bubble at most once a frame. */
  async function stream(response, reply, node) {
    let queued = false;
    const paint = () => {
      queued = false;
      updateBubble(node, reply);
      el.messages.scrollTop = el.messages.scrollHeight;
    };
    for await (const part of ndjson(response)) {
      if (part.error) throw new Error(part.error);
      if (part.message) {
        reply.content += part.message.content || "";
        reply.thinking = (reply.thinking || "") + (part.message.thinking || "");
      }
      if (part.done && part.eval_count && part.eval_duration) {
        const rate = part.eval_count / (part.eval_duration / 1e9);
        reply.stats = `${part.eval_count} tokens, ${rate.toFixed(1)} tokens/s`;
        if (part.done_reason === "length") reply.stats += " (stopped at num_predict)";
      }
      if (!queued) {
        queued = true;
        requestAnimationFrame(paint);
      }
    }
  }

  async function send(text, images) {
    const model = el.model.value;
    if (!model) {
      showError("No model selected: pull a model, then reload this page.");
      return;
    }
    hideError();
    const conversation = currentConversation() || newConversation(model);
    const user = { role: "user", content: text };
    if (images.length) user.images = images;
    const history = conversation.messages.filter((m) => m.role === "user" || (m.content && !m.error));
    const reply = { role: "assistant", content: "", model, streaming: true };
    conversation.messages.push(user, reply);
    conversation.title ||= text.slice(0, 60) || "Image";
    conversation.model = model;
    conversation.updated = Date.now();
    save();
    renderConversations();
    renderMessages();
    const node = el.messages.lastElementChild;
    const body = { model, stream: true, messages: [...history, user].map(wire) };
    if ((state.capabilities.get(model) || []).includes("thinking")) body.think = true;
    state.controller = new AbortController();
    setStreaming(true);
    try {
      const response = await api("/api/chat", {
        method: "POST", body: JSON.stringify(body), signal: state.controller.signal,
      });
      await stream(response, reply, node);
    } catch (err) {
      if (err instanceof KeyNeeded) {
        // Take the message back; it is sent again once a key is entered.
        conversation.messages.splice(-2, 2);
        state.afterKey = async () => { await loadModels(); send(text, images); };
      } else if (err.name === "AbortError") {
        reply.stopped = true;
      } else {
        reply.error = err.message;
      }
    } finally {
      reply.streaming = false;
      state.controller = null;
      setStreaming(false);
      save();
      if (conversation.messages.includes(reply)) updateBubble(node, reply);
      else renderMessages();
    }
  }

  el.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = el.prompt.value.trim();
    if ((!text && !state.images.length) || state.controller) return;
    const images = state.images;
    el.prompt.value = "";
    clearImages();
    send(text, images);
  });

  el.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      el.composer.requestSubmit();
    }
  });

  el.stop.addEventListener("click", () => state.controller?.abort());

  // -- start ---------------------------------------------------------------------------------

  if (!currentConversation()) state.currentId = null;
  el.forgetKey.hidden = !storedKey();
  renderConversations();
  renderMessages();
  loadModels();
})();
