/* The provider keys page: a user's own keys for providers (bring your own key), all through /api/provider-keys/.
   The key typed in goes to the server once and is cleared from the form at once: the page never shows it,
   keeps it, or gets it back (the API answers with its hint, sk-…abcd, only). */
(function () {
  "use strict";

  const { api, formatDate } = window.llmhub;
  const $ = (id) => document.getElementById(id);
  const body = $("keys-body");
  const form = $("save-key");
  const providerSelect = $("key-provider");
  const secretInput = $("key-secret");
  const labelInput = $("key-label");
  const saveButton = $("save-key-button");
  const modeNote = $("key-mode");
  const saveError = $("save-error");
  const saveDone = $("save-done");
  const listError = $("keys-error");
  const noProviders = $("no-providers");

  const STATUS_LABELS = { valid: "Valid", invalid: "Invalid", unchecked: "Unchecked", paused: "Paused" };
  const MODE_NOTES = {
    optional: "Your key is used for your requests to this provider when you have one; the platform's otherwise.",
    required: "Only users with their own key may use this provider's models.",
  };

  let providers = new Map(); // name → {name, kind, byok, key_prefix}
  let keys = new Map(); // provider name → the user's key for it

  function listOf(data) {
    return Array.isArray(data) ? data : data.results;
  }

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  /* What the form says about the chosen provider, and whether saving adds a key or replaces the user's. */
  function describeChoice() {
    const provider = providers.get(providerSelect.value);
    const existing = keys.get(providerSelect.value);
    secretInput.placeholder = provider && provider.key_prefix ? `${provider.key_prefix}…` : "Your API key";
    const notes = [];
    if (provider && MODE_NOTES[provider.byok]) notes.push(`${MODE_NOTES[provider.byok]} `);
    if (existing) {
      const hint = document.createElement("code");
      hint.className = "key-hint";
      hint.textContent = existing.hint;
      notes.push("Saving replaces your key ", hint, " in one step, once the new one is accepted.");
    }
    modeNote.replaceChildren(...notes);
    saveButton.textContent = existing ? "Replace key" : "Save key";
  }

  function statusCell(key) {
    const td = document.createElement("td");
    const badge = document.createElement("span");
    badge.className = `status status-${key.status}`;
    badge.textContent = STATUS_LABELS[key.status] || key.status;
    td.append(badge);
    if (key.status_detail) {
      const detail = document.createElement("small");
      detail.className = "muted status-detail";
      detail.textContent = key.status_detail;
      td.append(detail);
    }
    return td;
  }

  function button(text, ariaLabel, className, onClick) {
    const element = document.createElement("button");
    element.type = "button";
    element.className = `btn btn-small ${className}`.trim();
    element.textContent = text;
    element.setAttribute("aria-label", ariaLabel);
    element.addEventListener("click", () => onClick(element));
    return element;
  }

  function row(key) {
    const tr = document.createElement("tr");
    tr.dataset.keyId = key.id;
    const hint = document.createElement("td");
    const code = document.createElement("code");
    code.className = "key-hint";
    code.textContent = key.hint;
    hint.append(code);
    if (key.rotated_at) {
      const replaced = document.createElement("small");
      replaced.className = "muted";
      replaced.textContent = ` · replaced ${formatDate(key.rotated_at)}`;
      hint.append(replaced);
    }
    const actions = document.createElement("td");
    const group = document.createElement("div");
    group.className = "key-actions";
    if (key.status === "paused") {
      // The provider was moved to another host: the key goes there only once its owner says so.
      group.append(
        button(
          `Use at ${key.provider_host}`,
          `Confirm that your ${key.provider} key may be sent to ${key.provider_host}`,
          "btn-primary",
          (element) => confirmHost(key, element),
        ),
      );
    }
    group.append(
      button("Replace", `Replace your ${key.provider} key`, "", () => startReplace(key)),
      button("Check again", `Check your ${key.provider} key again`, "", (element) => validateKey(key, element)),
      button("Delete", `Delete your ${key.provider} key`, "btn-danger", (element) => deleteKey(key, element)),
    );
    actions.append(group);
    tr.append(
      cell(key.provider),
      cell(key.label || "—", key.label ? "" : "muted"),
      hint,
      statusCell(key),
      cell(key.last_validated_at ? formatDate(key.last_validated_at) : "Never", key.last_validated_at ? "" : "muted"),
      actions,
    );
    return tr;
  }

  function showListError(text) {
    listError.textContent = text;
    listError.hidden = false;
  }

  async function loadKeys() {
    listError.hidden = true;
    try {
      const list = listOf(await api("/api/provider-keys/"));
      keys = new Map(list.map((key) => [key.provider, key]));
      if (list.length === 0) {
        const tr = document.createElement("tr");
        const td = cell("No keys of your own yet. Add one above.", "muted");
        td.colSpan = 6;
        tr.append(td);
        body.replaceChildren(tr);
      } else {
        body.replaceChildren(...list.map(row));
      }
    } catch (error) {
      showListError(`Could not load your provider keys: ${error.message}`);
    }
    describeChoice();
  }

  async function loadProviders() {
    try {
      const list = listOf(await api("/api/provider-keys/providers/"));
      providers = new Map(list.map((provider) => [provider.name, provider]));
      const options = list.map((provider) => {
        const option = document.createElement("option");
        option.value = provider.name;
        option.textContent = provider.byok === "required" ? `${provider.name} (own key required)` : provider.name;
        return option;
      });
      providerSelect.replaceChildren(...options);
      providerSelect.disabled = list.length === 0;
      saveButton.disabled = list.length === 0;
      noProviders.hidden = list.length !== 0;
    } catch (error) {
      providerSelect.replaceChildren();
      saveButton.disabled = true;
      saveError.textContent = `Could not load the providers: ${error.message}`;
      saveError.hidden = false;
    }
    describeChoice();
  }

  function startReplace(key) {
    if (!providers.has(key.provider)) {
      showListError(`${key.provider} no longer accepts keys of your own: you may only delete this one.`);
      return;
    }
    providerSelect.value = key.provider;
    labelInput.value = key.label || "";
    saveError.hidden = true;
    saveDone.hidden = true;
    describeChoice();
    secretInput.focus();
  }

  async function validateKey(key, element) {
    element.disabled = true;
    let problem = "";
    try {
      const checked = await api(`/api/provider-keys/${key.id}/validate/`, { method: "POST" });
      if (checked && checked.status === "invalid") {
        problem = `${key.provider} refused your key ${key.hint}: ${checked.status_detail || "no reason given"}`;
      }
    } catch (error) {
      problem = error.message;
    }
    await loadKeys(); // redraws the row with its new status (and its button enabled again)
    if (problem) showListError(problem);
  }

  async function confirmHost(key, element) {
    const question = `Send your ${key.provider} key ${key.hint} to ${key.provider_host} from now on? You gave it for ${key.confirmed_host || "the provider's former host"}.`;
    if (!window.confirm(question)) return;
    element.disabled = true;
    let problem = "";
    try {
      await api(`/api/provider-keys/${key.id}/confirm-host/`, { method: "POST" });
    } catch (error) {
      problem = error.message;
    }
    await loadKeys();
    if (problem) showListError(problem);
  }

  async function deleteKey(key, element) {
    const question = `Delete your ${key.provider} key ${key.hint}? Your requests to ${key.provider} stop using it at once.`;
    if (!window.confirm(question)) return;
    element.disabled = true;
    listError.hidden = true;
    try {
      await api(`/api/provider-keys/${key.id}/`, { method: "DELETE" });
    } catch (error) {
      showListError(error.message);
      element.disabled = false;
      return;
    }
    saveDone.hidden = true;
    await loadKeys();
  }

  providerSelect.addEventListener("change", describeChoice);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    saveError.hidden = true;
    saveDone.hidden = true;
    const request = { provider: providerSelect.value, api_key: secretInput.value.trim(), label: labelInput.value.trim() };
    // Out of the form before the request leaves: whatever the answer, the page no longer holds the key.
    secretInput.value = "";
    saveButton.disabled = true;
    try {
      const saved = await api("/api/provider-keys/", { method: "POST", body: request });
      const state = STATUS_LABELS[saved.status] || saved.status;
      saveDone.textContent = `Saved your ${saved.provider} key ${saved.hint} (${state.toLowerCase()}).`;
      saveDone.hidden = false;
      labelInput.value = "";
    } catch (error) {
      saveError.textContent = error.message;
      saveError.hidden = false;
      secretInput.focus();
    } finally {
      request.api_key = "";
      saveButton.disabled = providers.size === 0; // never a form to send without a provider to send it to
    }
    await loadKeys();
  });

  loadProviders().then(loadKeys);
})();
