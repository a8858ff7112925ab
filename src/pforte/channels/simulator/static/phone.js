// Patient phone page: poll the chat partial every second, post forms with fetch, mark read when seen.
(function () {
  "use strict";
  const chat = document.getElementById("chat");
  if (!chat) {
    return;
  }
  const chatUrl = chat.dataset.chatUrl;
  const readUrl = chat.dataset.readUrl;
  let last = chat.innerHTML;

  function scrollDown() {
    chat.scrollTop = chat.scrollHeight;
  }

  function markRead() {
    if (document.visibilityState !== "visible") {
      return;
    }
    const body = new FormData();
    body.append("user", chat.dataset.user);
    body.append("number", chat.dataset.number);
    fetch(readUrl, { method: "POST", body: body, headers: { Accept: "application/json" } }).catch(function () {});
  }

  function refresh() {
    fetch(chatUrl, { cache: "no-store" })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html !== null && html !== last) {
          chat.innerHTML = html;
          last = html;
          scrollDown();
          markRead();
        }
      })
      .catch(function () {});
  }

  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.classList.contains("js-post")) {
      return;
    }
    event.preventDefault();
    fetch(form.action, { method: "POST", body: new FormData(form), headers: { Accept: "application/json" } })
      .then(function (response) {
        if (response.ok && form.id === "send-form") {
          form.reset();
          const input = form.querySelector("input[name=text]");
          if (input) {
            input.focus();
          }
        } else if (response.ok && form.enctype === "multipart/form-data") {
          form.reset();
        }
        refresh();
      })
      .catch(function () {});
  });

  document.addEventListener("visibilitychange", markRead);
  scrollDown();
  markRead();
  window.setInterval(refresh, 1000);
})();
