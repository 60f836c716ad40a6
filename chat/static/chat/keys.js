/* The API keys page: list, create (the secret is shown once), revoke — all through /api/keys/. */
(function () {
  "use strict";

  const { api, formatDate } = window.llmhub;
  const $ = (id) => document.getElementById(id);
  const body = $("keys-body");
  const form = $("create-key");
  const nameInput = $("key-name");
  const manageInput = $("key-manage");
  const conversationsInput = $("key-conversations");
  const usageInput = $("key-usage");
  // Offered only to those whose role may use them (the page leaves them out for others).
  const auditInput = $("key-audit");
  const experimentsInput = $("key-experiments");
  const createButton = $("create-key-button");
  const createError = $("create-error");
  const secretBox = $("new-secret");
  const secretValue = $("secret-value");
  const listError = $("keys-error");

  $("base-url").textContent = `${location.origin}/v1`;

  function statusOf(key) {
    if (key.revoked_at) return ["revoked", "Revoked"];
    if (key.expires_at && new Date(key.expires_at) <= new Date()) return ["expired", "Expired"];
    return ["active", "Active"];
  }

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  function nameCell(key) {
    const td = cell(key.name);
    const notes = [];
    if ((key.scopes || []).includes("keys:manage")) notes.push("manages keys");
    if ((key.scopes || []).includes("conversations:manage")) notes.push("reads all conversations");
    if ((key.scopes || []).includes("usage:read")) notes.push("reads all usage");
    if ((key.scopes || []).includes("audit:read")) notes.push("reads the audit log");
    if ((key.scopes || []).includes("experiments:manage")) notes.push("manages experiments");
    if (key.parent) notes.push("created by a key");
    if (notes.length) {
      const note = document.createElement("small");
      note.className = "muted key-notes";
      note.textContent = ` · ${notes.join(" · ")}`;
      td.append(note);
    }
    return td;
  }

  function row(key) {
    const tr = document.createElement("tr");
    tr.dataset.keyId = key.id;
    const prefix = document.createElement("td");
    const code = document.createElement("code");
    code.textContent = `${key.prefix}…`;
    prefix.append(code);
    const [status, label] = statusOf(key);
    const statusCell = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = `status status-${status}`;
    badge.textContent = label;
    statusCell.append(badge);
    const actions = document.createElement("td");
    if (status === "active") {
      const revoke = document.createElement("button");
      revoke.type = "button";
      revoke.className = "btn btn-small btn-danger";
      revoke.textContent = "Revoke";
      revoke.setAttribute("aria-label", `Revoke key “${key.name}”`);
      revoke.addEventListener("click", () => revokeKey(key, revoke));
      actions.append(revoke);
    }
    tr.append(
      nameCell(key),
      prefix,
      cell(formatDate(key.created_at)),
      cell(key.last_used_at ? formatDate(key.last_used_at) : "Never", key.last_used_at ? "" : "muted"),
      statusCell,
      actions,
    );
    return tr;
  }

  async function loadKeys() {
    listError.hidden = true;
    try {
      const data = await api("/api/keys/?limit=200");
      const keys = Array.isArray(data) ? data : data.results;
      if (keys.length === 0) {
        const tr = document.createElement("tr");
        const td = cell("No keys yet. Create one above.", "muted");
        td.colSpan = 6;
        tr.append(td);
        body.replaceChildren(tr);
      } else {
        body.replaceChildren(...keys.map(row));
      }
    } catch (error) {
      listError.textContent = `Could not load your keys: ${error.message}`;
      listError.hidden = false;
    }
  }

  async function revokeKey(key, button) {
    const question = `Revoke “${key.name}” (${key.prefix}…)? Programs using it, or a key created with it, stop at once.`;
    if (!window.confirm(question)) return;
    button.disabled = true;
    try {
      await api(`/api/keys/${key.id}/revoke/`, { method: "POST" });
    } catch (error) {
      listError.textContent = error.message;
      listError.hidden = false;
      button.disabled = false;
      return;
    }
    await loadKeys();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    createError.hidden = true;
    createButton.disabled = true;
    try {
      const request = { name: nameInput.value.trim() };
      request.scopes = [];
      if (manageInput.checked) request.scopes.push("keys:manage");
      if (conversationsInput.checked) request.scopes.push("conversations:manage");
      if (usageInput.checked) request.scopes.push("usage:read");
      if (auditInput && auditInput.checked) request.scopes.push("audit:read");
      if (experimentsInput && experimentsInput.checked) request.scopes.push("experiments:manage");
      const created = await api("/api/keys/", { method: "POST", body: request });
      secretValue.textContent = created.secret;
      secretBox.hidden = false;
      secretValue.focus();
      nameInput.value = "";
      manageInput.checked = false;
      conversationsInput.checked = false;
      usageInput.checked = false;
      if (auditInput) auditInput.checked = false;
      if (experimentsInput) experimentsInput.checked = false;
      await loadKeys();
    } catch (error) {
      createError.textContent = error.message;
      createError.hidden = false;
    } finally {
      createButton.disabled = false;
    }
  });

  loadKeys();
})();
